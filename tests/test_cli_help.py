"""`lora-kit --help`, `lora-kit <script> --help`, `--version` and argument errors, as a user runs them: in a fresh
process, answered before torch or the training modules are imported."""
import subprocess, sys

import lora_kit
from lora_kit.cli import COMMANDS

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "lora_kit.train", "lora_kit.models", "lora_kit.sd3", "lora_kit.sample")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lora_kit.cli", *args], capture_output=True, text=True)


def test_overview_lists_every_command_and_starts_at_demo():
    for args in (["--help"], ["-h"]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert all(f"\n  {name} " in r.stdout for name in COMMANDS) and "lora-kit demo" in r.stdout
    r = cli()
    assert r.returncode == 2 and all(name in r.stdout for name in COMMANDS)


def test_version():
    for args in (["--version"], ["train_network", "--version"], ["sd3_train_network", "--version"], ["merge", "--version"]):
        r = cli(*args)
        assert (r.returncode, r.stdout) == (0, f"lora-kit {lora_kit.__version__}\n"), (args, r.stderr)


def test_script_help_groups_options_with_their_help():
    for flag in ("--help", "-h"):
        r = cli("train_network", flag)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        out = r.stdout
        assert out.startswith("usage: lora-kit train_network")
        for group in ("model", "dataset", "network", "optimizer", "saving", "sampling", "logging", "advanced"):
            assert f"\n{group}:\n" in out, group
        network = out.split("\nnetwork:\n")[1].split("\n\n")[0]
        assert "  --network_dim INT\n      network dimensions" in network
        assert "  --learning_rate FLOAT\n      learning rate (default: 2e-06)" in out
        assert "--clip_l" not in out                                # an sd3_train_network option
    r = cli("sd3_train_network", "--help")
    assert r.returncode == 0 and "\n  --clip_l STR\n" in r.stdout and "\n  --weighting_scheme " in r.stdout
    r = cli("train_network.py", "--help")                          # the script name sd-scripts users type
    assert r.returncode == 0 and "\n  --network_dim INT\n" in r.stdout


def test_other_commands_have_argparse_help():
    for command in ("demo", "check_toy", "convert", "convert_sd3_lora", "merge"):
        r = cli(command, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: lora-kit {command}"), (command, r.stderr)


def test_unknown_flag_and_command_still_name_the_closest():
    r = cli("train_network", "--network_dimm", "4")
    assert r.returncode == 2 and "unknown option --network_dimm (did you mean --network_dim?)" in r.stderr
    r = cli("trian_network")
    assert r.returncode == 2 and "did you mean train_network?" in r.stderr


def test_help_and_argument_errors_import_nothing_heavy():
    "The test of the fast start: these answers come before torch, diffusers or lora_kit's training modules load."
    for args in (["--help"], ["train_network", "--help"], ["sd3_train_network", "-h"], ["train_network", "--no_such_flag"],
                 ["sd3_train_network", "--network_dimm", "4"], ["convert", "--help"], ["demo", "-h"], ["bogus"]):
        code = ("import contextlib, io, sys\n"
                "from lora_kit.cli import main\n"
                "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), "
                f"contextlib.suppress(SystemExit): main({args!r})\n"
                f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (0, "[]\n", ""), (args, r.stdout, r.stderr[-2000:])
