"""Which teacher layer each student layer learns from."""

from __future__ import annotations

from ..runtime.errors import CodirError


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Teacher layer (1-based) for student layers 1..N: m(i) = floor(i * M / N); 6 of 12 gives 2,4,...,12."""
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise CodirError(f"student depth {num_student_layers} must be between 1 and the teacher's depth {num_teacher_layers}")
    return [i * num_teacher_layers // num_student_layers for i in range(1, num_student_layers + 1)]


def resolve_layer_map(explicit: list[int] | str | None, num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """The configured map checked against both depths, the teacher's odd layers 1, 3, 5, ... (`odd`, the CoDIR
    authors' map, for a student of half the teacher's depth), or the uniform default."""
    if explicit is None:
        return uniform_layer_map(num_student_layers, num_teacher_layers)
    if explicit == "odd":
        explicit = list(range(1, num_teacher_layers + 1, 2))
        if len(explicit) != num_student_layers:
            raise CodirError(
                f"codir.layer_map: odd maps the teacher's {len(explicit)} odd layers, one per student layer, but the student "
                f"has {num_student_layers}; set student.num_layers={len(explicit)} or list the layers"
            )
    if len(explicit) != num_student_layers:
        raise CodirError(f"codir.layer_map: {explicit} has {len(explicit)} entries but the student has {num_student_layers} layers")
    beyond = [layer for layer in explicit if not 1 <= layer <= num_teacher_layers]
    if beyond:
        raise CodirError(f"codir.layer_map: teacher layer(s) {beyond} outside 1..{num_teacher_layers} (the teacher's depth)")
    return list(explicit)
