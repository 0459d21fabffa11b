"""`adm models`, `adm fetch`, `adm convert-weights`: parse, call cache / convert, print."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .cache import (cache_root, cache_status, check_fetched, convert_entry, converted_path, fetch_entry,
                    verify_converted)
from .cli import app, fail, handle_errors
from .errors import AdmError
from .metadata import STORED_DTYPES
from .registry import Entry, load_registry


def _size(entry: Entry) -> str:
    """Published size, else ~4 bytes per float32 parameter."""
    if entry.size is not None:
        return f"{entry.size / 1e9:.2f} GB"
    if entry.params is not None:
        return f"~{entry.params * 4 / 1e9:.2f} GB"
    return "-"


def _cached(entry: Entry) -> str:
    st = cache_status(entry)
    if entry.bundled:
        return "bundled" if st.converted else "bundled (missing)"
    return "converted" if st.converted else ("fetched" if st.fetched else "-")


@app.command("models")
@handle_errors
def models() -> None:
    """List every model in the registry, with its cache status (ADM_HOME)."""
    table = Table(title=f"ADM models (cache: {cache_root()})", title_justify="left")
    for column in ("name", "res", "conditional", "kind", "publisher", "size", "cached"):
        table.add_column(column, no_wrap=column == "name")
    for e in load_registry().entries:
        name = f"{e.name} *" if e.default else e.name
        conditional = "class" if e.class_cond else ("-" if e.kind == "classifier" else "no")
        table.add_row(name, str(e.resolution), conditional, e.kind, e.publisher, _size(e), _cached(e))
    console = Console()
    if not console.is_terminal:  # piped: rich would assume 80 columns and cut the cells to "cl…"
        console = Console(width=max(console.width, 160))
    console.print(table)
    console.print("* the default of `adm sample --res N`.  Fetch with `adm fetch NAME`.")


def _selection(names: List[str], res: Optional[int], all_: bool, upsample: bool = False) -> list[Entry]:
    registry = load_registry()
    if sum(map(bool, (names, res is not None, all_))) != 1:
        fail("give model NAMEs, --res N or --all (one of them); `adm models` lists the names", 2)
    if upsample and res is None:
        fail("--upsample goes with --res 256 or 512: it fetches what `adm sample --res N --upsample` uses", 2)
    if all_:
        return [e for e in registry.entries if not e.bundled]
    if res is not None:
        base, up = registry.upsample_pair(res) if upsample else (registry.default_for(res), None)
        clf = [registry.get(base.classifier)] if base.classifier and base.classifier != base.name else []
        return [base, *clf, *([up] if up else [])]
    return [registry.get(n) for n in dict.fromkeys(names)]


_MIRROR_HELP = "Download BASE + file name instead of each file's URL (http(s)://, file:// or a local folder)."
_OFFLINE_HELP = "Never download: only verify and convert what the cache holds; fail on what is missing."
_RES_HELP = "Fetch what `adm sample --res N` uses: the default model of that resolution and its classifier."
_UPSAMPLE_HELP = ("With --res 256 or 512: fetch what `adm sample --res N --upsample` uses (the 64 or 128 model, its "
                  "classifier and the upsampler).")


@app.command("fetch")
@handle_errors
def fetch(
    names: List[str] = typer.Argument(None, help="Registry names (see `adm models`).", show_default="none"),
    res: Optional[int] = typer.Option(None, "--res", help=_RES_HELP, show_default="none"),
    upsample: bool = typer.Option(False, "--upsample", help=_UPSAMPLE_HELP, show_default="off"),
    all_: bool = typer.Option(False, "--all", show_default="off",
                              help="Fetch every published file in the registry: about 41 GB of downloads, and "
                                   "as much again for their conversions (--no-convert skips those)."),
    mirror: Optional[str] = typer.Option(None, "--mirror", envvar="ADM_MIRROR", help=_MIRROR_HELP,
                                         show_default="none: each file's own URL"),
    offline: bool = typer.Option(False, "--offline", show_default="off (env ADM_OFFLINE=1 turns it on)",
                                 help=_OFFLINE_HELP),
    no_convert: bool = typer.Option(False, "--no-convert", show_default="off: convert after download",
                                    help="Keep the downloaded file only; skip the conversion to safetensors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", show_default="off", help="No progress bars or messages."),
) -> None:
    """Download published ADM checkpoints into the cache, verify them and convert them.

    Files go to ADM_HOME (default: the user cache folder, e.g. ~/.cache/adm-cli). Downloads
    resume after an interruption and are checked against the published sha256 (or, where
    none is published, the one recorded at the first download).
    """
    console = Console(stderr=True, quiet=quiet, soft_wrap=True)
    selection = _selection(names or [], res, all_, upsample)
    failed: list[AdmError] = []
    for entry in selection:
        try:
            _fetch_one(entry, console, offline=offline, mirror=mirror, no_convert=no_convert, quiet=quiet)
        except AdmError as exc:
            if len(selection) == 1:
                raise
            # One dead URL must not cost the others of the selection (--all is ~41 GB): go on,
            # one line per failure, and a failing exit code at the end.
            typer.echo(f"error: {entry.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
            failed.append(exc)
    if failed:
        fail(f"{len(failed)} of {len(selection)} models failed (above)", max(e.exit_code for e in failed))


def _fetch_one(entry: Entry, console: Console, *, offline: bool, mirror: str | None, no_convert: bool,
               quiet: bool) -> None:
    if entry.bundled:
        console.print(f"{entry.name}: bundled with adm-cli, nothing to fetch")
        return
    if not no_convert and cache_status(entry).converted and verify_converted(entry, quiet=quiet):
        console.print(f"{entry.name}: converted already (checked)")  # adm sample reads only these
        for role in entry.roles:
            console.print(f"  {role}: {converted_path(entry, role)}")
        return
    raw, digest = fetch_entry(entry, offline=offline, mirror=mirror, quiet=quiet)
    if no_convert:
        check_fetched(entry, raw, digest)  # still read once: an unusable download is removed
        console.print(f"{entry.name}: {raw} (sha256 {digest[:16]}...)")
        return
    converted = convert_entry(entry, raw, digest, quiet=True)  # first: it may find the file unusable
    console.print(f"{entry.name}: {raw} (sha256 {digest[:16]}...)")
    for role, path in converted.items():
        console.print(f"  {role}: {path}")


_SRC_HELP = ("An OpenAI .pt or mmagic .pth checkpoint, a safetensors file with OpenAI names, or one adm "
             "converted (its recorded architecture is used: convert again to another --dtype).")
_DST_DEFAULT = ("SRC with .safetensors (.unet/.classifier.safetensors for two networks); "
                "a .safetensors SRC gets .adm before them, or the new dtype if adm wrote it")
_DST_HELP = ("Output file, or a folder to write into: an existing one, or any path ending in / "
             "(created if missing). Never SRC itself.")
_ARCH_HELP = "Architecture preset or registry name; repeat for a U-Net and a classifier."
_CONFIG_HELP = ("JSON or TOML file of guided-diffusion flags (image_size, num_channels, ...; classifier_* flags "
                "for a classifier; or \\[unet] and \\[classifier] tables) for a custom checkpoint. Other flags of "
                "OpenAI's scripts are ignored; a misspelt model flag is refused.")


@app.command("convert-weights")
@handle_errors
def convert_weights(
    src: Path = typer.Argument(..., help=_SRC_HELP, show_default=False),
    # str, not Path: Path drops the trailing slash that makes DST a new folder
    dst: Optional[str] = typer.Argument(None, help=_DST_HELP, show_default=_DST_DEFAULT),
    arch: Optional[List[str]] = typer.Option(None, "--arch", help=_ARCH_HELP, show_default="from the registry"),
    config: Optional[Path] = typer.Option(None, "--config", help=_CONFIG_HELP, show_default="none"),
    dtype: str = typer.Option("float32", "--dtype", help=f"Stored dtype: {', '.join(STORED_DTYPES)}."),
    force: bool = typer.Option(False, "--force", show_default="off: refuse", help="Overwrite existing outputs."),
    quiet: bool = typer.Option(False, "--quiet", "-q", show_default="off", help="Print nothing but errors."),
) -> None:
    """Convert a checkpoint to adm-cli's safetensors layout (OpenAI key names, config in metadata).

    The file is read without running any code it carries. Its architecture comes from --arch
    or --config, from the metadata of a file adm converted before, or from the registry (matched
    by sha256 or file name); shapes alone never decide.
    """
    from .flags import conversion_args

    conversion_args(src, arch or None, config, dtype)  # a slip answers before torch is imported (3-5 s)
    from .convert import convert_checkpoint

    console = Console(stderr=True, quiet=quiet, soft_wrap=True)
    paths = convert_checkpoint(src, dst, arch=arch or None, config=config, dtype=dtype, force=force,
                               log=console.print)
    for role, path in paths.items():
        console.print(f"{role}: {path}")
