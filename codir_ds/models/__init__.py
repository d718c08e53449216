"""Models and engines: loading and planning teacher/student, encoder families, DeepSpeed configs and engines."""
