"""Stage-2 entry point: `deepspeed launch/finetune.py [teacher] --config task.yaml [--section.key=value ...]`; `--help` lists every key.

Without a command it distils the finetuned teacher into the student; `teacher` finetunes the teacher first."""

from codir_ds.cli import finetune, run_command

if __name__ == "__main__":
    run_command(finetune)
