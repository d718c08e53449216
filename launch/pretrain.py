"""Stage-1 entry point: `deepspeed launch/pretrain.py --config run.yaml [--section.key=value ...]`; `--help` lists every key."""

from codir_ds.cli import pretrain, run_command

if __name__ == "__main__":
    run_command(pretrain)
