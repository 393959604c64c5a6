"""The command line as a newcomer meets it: help that answers at once, and mistakes named by the command they were
made in."""

import subprocess
import sys

import pytest

from r2unet.commands.cli import COMMANDS, main


def test_help_of_every_command_answers_without_importing_torch():
    """torch was imported to build the parser: every --help took 3-4 s. Help needs no torch at all now (what it
    takes is then well under a second; the test checks the cause, not a time)."""
    script = ("import sys\n"
              "from r2unet.commands.cli import main\n"
              f"for argv in [['--help']] + [[c, '--help'] for c in {list(COMMANDS)!r}]:\n"
              "    try:\n"
              "        main(argv)\n"
              "    except SystemExit:\n"
              "        pass\n"
              "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stderr
    assert done.stdout.count("usage: r2unet") == len(COMMANDS) + 1 and "--batch_size" in done.stdout


@pytest.mark.parametrize("argv,command,meant", [
    (["train", "--batchsize", "4"], "train", "--batchsize: did you mean --batch_size?"),
    (["train", "--data_path", "d", "--lrr=0.1"], "train", "--lrr: did you mean --lr?"),
    (["predict", "--chekpoint", "m.pt", "--input", "i", "--output", "o"], "predict",
     "--chekpoint: did you mean --checkpoint?"),  # named before "required: --checkpoint"
])
def test_a_mistyped_flag_is_named_by_its_command_with_the_flag_meant(argv, command, meant, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert err.startswith(f"usage: r2unet {command} ") and f"r2unet {command}: error: unrecognized arguments" in err
    assert meant in err


def test_train_usage_is_a_line_and_unrelated_words_get_no_guess(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data_path", "d", "--zzz_unheard_of"])
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "usage: r2unet train [-h] --data_path DIR [--output_dir DIR] [FLAGS]"
    assert "unrecognized arguments: --zzz_unheard_of" in err and "did you mean" not in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--checkpoint", "m.pt", "--data_path", "d", "stray"])
    assert "r2unet evaluate: error: unrecognized arguments: stray" in capsys.readouterr().err
