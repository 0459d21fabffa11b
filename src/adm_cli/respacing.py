"""Respacing: which of the T training timesteps a sampler visits, as the reference's strings
("250", "ddim25", "10,15,20") select them (Nichol & Dhariwal 2021, section 4). Plain Python, so
that a bad --steps or --respacing is refused before torch is imported."""

from __future__ import annotations

from .errors import RespacingError


def space_timesteps(steps: int, spec: str | int) -> list[int]:
    """The subset of ``range(steps)`` a respacing string selects, ascending.

    ``"ddimN"``: the evenly strided set range(0, T, k) with exactly N members.
    ``"a,b,c"``: split the T steps into that many near-equal sections and take a, b, c steps
    evenly (rounded) from each, both ends included (a 0 takes none from its section). ``"N"`` is
    one section; ``""`` keeps all T.
    """
    text = str(spec).strip()
    if text == "":
        if str(spec):  # " ": the reference refuses it too; an empty string is a choice, blanks a slip
            raise RespacingError(f"bad respacing {spec!r}: blank (give '' for all {steps} steps)")
        return list(range(steps))
    if text.startswith("ddim"):
        try:
            want = int(text[4:])
        except ValueError:
            raise RespacingError(f"bad respacing {text!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, steps):
            if len(range(0, steps, stride)) == want:
                return list(range(0, steps, stride))
        raise RespacingError(f"bad respacing {text!r}: no integer stride gives exactly {want} of {steps} steps")
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise RespacingError(f"bad respacing {text!r}: expected 'N', 'ddimN' or comma-separated counts") from None
    size, extra = divmod(steps, len(counts))
    chosen: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count < 0 or count > section:  # (0 takes nothing from its section, as in the reference)
            raise RespacingError(
                f"bad respacing {text!r}: cannot take {count} steps from a section of {section}"
            )
        stride = 1 if count == 1 else (section - 1) / (count - 1)
        # Accumulate the fractional index (not j * stride): the float sums decide the
        # .5 roundings, and they must be the reference's.
        pos = 0.0
        for _ in range(count):
            chosen.add(start + round(pos))
            pos += stride
        start += section
    if not chosen:
        raise RespacingError(f"bad respacing {text!r}: it selects no step")
    if len(chosen) == 1 and steps > 1:
        # One timestep (t = 0 for "1") would have the network denoise pure noise as if it were
        # at that t: clipped noise, not a sample. The reference cannot run it either.
        raise RespacingError(f"bad respacing {text!r}: it selects one step (t = {min(chosen)}); "
                             "a sampler needs at least 2")
    return sorted(chosen)
