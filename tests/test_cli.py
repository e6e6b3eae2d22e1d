"""End-to-end tests of the `metagg` command (subprocesses, as a user runs it)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metagg.simulation import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def metagg(*args, check=True, timeout=120):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "metagg", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"metagg {args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    proc = metagg("run", "configs/digits.yaml", "--set", "rounds=20", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 20
    assert '"final_test_accuracy"' in proc.stdout
    assert (out / "curves.png").exists() and (out / "config.yaml").exists()
    assert "\r" not in proc.stderr  # no progress bar when not attached to a terminal


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--set", "roundz=3"], "unknown key roundz"),
        (["run", "--set", "aggregator=avg"], "aggregator.name: unknown value 'avg'"),
        (["run", "nope.yaml"], "config file not found: nope.yaml"),
        (["run", "--set", "data.name=mnist", "--set", "data.data_dir=/nonexistent"], "mnist"),
        (["compare", "--aggregators", "mean,foo", "--out", "x"], "unknown value 'foo'"),
        (["run", "--resume"], "--resume needs --out"),
    ],
)
def test_user_errors_are_one_line(args, message):
    proc = metagg(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_list_and_help():
    out = metagg("list").stdout
    assert "aggregators:" in out and "median" in out and "alie" in out
    assert "--set" in metagg("run", "--help").stdout


def test_compare_writes_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    metagg("compare", "configs/digits.yaml", "--aggregators", "mean,median", "--seeds", "2",
           "--set", "rounds=20", "--out", str(out))
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 4
    table = (out / "results.md").read_text()
    assert "| mean |" in table and "| median |" in table and "±" in table
    assert (out / "curves.png").stat().st_size > 1000


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    # a fixed thread count: float sums can differ in the last bits between counts
    settings = ["--set", "rounds=400", "--set", "checkpoint_every=20", "--set", "eval_every=20",
                "--threads", "1"]
    full = tmp_path / "full"
    metagg("run", "configs/digits.yaml", *settings, "--out", str(full))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "metagg", "run", "configs/digits.yaml",
                             *settings, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            ckpt = killed / "checkpoint.json"
            if ckpt.exists():
                try:
                    if json.loads(ckpt.read_text())["round"] >= 60:
                        break
                except (json.JSONDecodeError, KeyError):
                    pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    stopped_at = json.loads((killed / "checkpoint.json").read_text())["round"]
    assert 60 <= stopped_at < 400, "the run was not killed mid-way"

    metagg("run", "configs/digits.yaml", *settings, "--out", str(killed), "--resume")

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    resumed = strip(read_metrics(killed / "metrics.jsonl"))
    assert resumed == strip(read_metrics(full / "metrics.jsonl"))


def test_resume_from_corrupt_checkpoint_fails_clearly(tmp_path):
    out = tmp_path / "r"
    metagg("run", "--set", "rounds=10", "--out", str(out))
    (out / "checkpoint.safetensors").write_bytes(b"garbage")
    proc = metagg("run", "--set", "rounds=20", "--out", str(out), "--resume", check=False)
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_compare_attack_matrix_marks_unsafe_and_undefined(tmp_path):
    out = tmp_path / "robust"
    proc = metagg("compare", "--aggregators", "mean,krum,trimmed_mean", "--attacks",
                  "none,ipm:7", "--seeds", "1", "--set", "rounds=10", "--out", str(out))
    table = (out / "results.md").read_text()
    assert "| aggregator | no attack | ipm 7/10 |" in table
    assert "†" in table  # krum at 7/10 runs outside its guarantee
    assert "| trimmed_mean |" in table and "n/a" in table  # undefined at 7/10
    assert "n/a (rule undefined here)" in proc.stdout
    assert (out / "curves_ipm_7of10.png").exists()


def test_meta_train_then_run_and_zoo(tmp_path):
    out = tmp_path / "rnn"
    metagg("meta-train", "rnn", "--iterations", "2", "--set", "unroll=10", "--set",
           "truncation=5", "--set", "validate_every=2", "--set", "validation_seeds=1",
           "--set", "long_horizon=1", "--out", str(out))
    assert (out / "aggregator.safetensors").exists() and (out / "aggregator.json").exists()
    proc = metagg("run", "--set", "rounds=5", "--set", f"aggregator=rnn:{out}")
    assert '"rounds": 5' in proc.stdout
    zoo = metagg("zoo", "list").stdout
    assert "rnn:pretrained/digits-mlp20-lstm" in zoo
    bad = metagg("meta-train", "rnn", "--set", "colour=red", "--out", str(out), check=False)
    assert bad.returncode == 2 and "unknown key colour; allowed:" in bad.stderr
    # on tasks drawn from a family: the trained weights run on any other task
    many = tmp_path / "rnn-tasks"
    metagg("meta-train", "rnn", "--tasks", "synthetic", "--workers", "4", "--iterations", "2",
           "--set", "num_tasks=2", "--set", "validation_tasks=1", "--set", "unroll=4",
           "--set", "truncation=2", "--set", "validate_every=2", "--set", "validation_seeds=1",
           "--set", "long_horizon=0", "--out", str(many))
    info = json.loads((many / "aggregator.json").read_text())["trained_on"]
    assert info["tasks"] == "synthetic" and len(info["training_task_names"]) == 2
    proc = metagg("run", "--set", "rounds=3", "--set", "workers.num_workers=4",
                  "--set", f"aggregator=rnn:{many}")
    assert '"rounds": 3' in proc.stdout


def test_bad_yaml_and_bad_out_are_one_line_errors(tmp_path):
    proc = metagg("compare", "--aggregators", "mean", "--out", str(tmp_path / "x"),
                  "--aggregator-options", "{mean: [", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (tmp_path / "file").write_text("")
    proc = metagg("run", "--set", "rounds=2", "--out", str(tmp_path / "file"), check=False)
    assert proc.returncode == 2 and "File exists" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- help and list
def run_main(capsys, *args):
    """`metagg ARGS` in this process: (exit code, stdout)."""
    from metagg.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # --help, argparse errors
        code = exc.code
    return code, capsys.readouterr().out


def subcommand_help(parser) -> dict[str, str]:
    """Each sub-command of `parser` -> its one-line help."""
    import argparse

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {c.dest: c.help for c in sub._choices_actions}


def test_no_arguments_lists_every_command_with_its_help_on_one_line(capsys, monkeypatch):
    import re

    from metagg.cli import build_parser

    monkeypatch.setenv("COLUMNS", "100")
    code, out = run_main(capsys)
    assert code == 2
    commands = subcommand_help(build_parser())
    assert len(commands) >= 10
    for name, help_text in commands.items():
        assert re.search(rf"^ +{re.escape(name)} +{re.escape(help_text)}$", out, re.M), name


@pytest.mark.parametrize(("group", "commands"), [
    ("reproduce", ["ji2019", "joseph2025", "generalization"]),
    ("meta-train", ["rnn", "arnn", "lagg", "lopt"]),
])
def test_a_command_group_alone_lists_its_commands(capsys, group, commands):
    """`metagg reproduce` used to print a usage line and 'the following arguments are
    required: PAPER'."""
    code, out = run_main(capsys, group)
    assert code == 2
    assert out.startswith(f"usage: metagg {group}")
    for command in commands:
        assert f"\n    {command}" in out


def listed_options(line: str) -> dict[str, str]:
    """'needs ...; options: a=1, b=null (why)' -> {'a': '1', 'b': 'null'}."""
    import re

    _, _, text = line.partition("options: ")
    return {key: value.split(" (")[0]
            for key, value in re.findall(r"(\w+)=(\[[^\]]*\]|[^,]*)", text)}


def test_list_shows_every_rule_and_attack_with_its_options_and_defaults(capsys):
    import yaml

    from metagg.aggregators.registry import aggregator_names, aggregator_spec, build_aggregator
    from metagg.attacks import ATTACKS, make_attack

    code, out = run_main(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert "null (the default) means attack.num_byzantine" in out
    assert "--set aggregator.options.tau=5" in out

    def details(name: str) -> str:  # the line under a name
        (i,) = [k for k, line in enumerate(lines) if line.split()[:1] == [name]]
        return lines[i + 1].strip()

    assert details("krum") == ("needs n > 2f + 2 (allow_unsafe: n >= f + 3); options: "
                               "allow_unsafe=false")
    assert details("bulyan").startswith("needs n >= 4f + 3 (allow_unsafe: n >= 4f + 1)")
    assert details("centered_clip") == "options: tau=10.0, iters=1"
    assert details("geometric_median") == "options: iters=8, nu=0.1"
    assert "rho=null (gamma / 200)" in details("zeno") and "discard=f" in details("zeno")
    assert details("median") == "no options"
    assert details("sign_flip") == "options: scale=1.0"
    assert details("ipm") == "options: eps=0.1"
    assert "scales=[0.1, 0.3, 1.0" in details("adaptive")
    assert "init=true, init_seed=0" in details("lagg")
    assert "bucket_size=2" in out and "defaults lr=1.0, beta=0.9" in out

    # what is listed is what the code takes: every rule and attack accepts its listed
    # options at their listed defaults (those metagg fills in left out)
    for name in aggregator_names():
        if aggregator_spec(name).rule is None:
            continue
        options = {k: yaml.safe_load(v) for k, v in listed_options(details(name)).items()
                   if k not in ("discard", "seed")} if "options:" in details(name) else {}
        build_aggregator(name, f=1, options=options)
    attacks = next(k for k, line in enumerate(lines) if line.startswith("attacks:"))
    for name in ATTACKS:
        row = next(k for k in range(attacks, len(lines)) if lines[k].split()[:1] == [name])
        below = lines[row + 1].strip()
        options = listed_options(below) if below.startswith("options:") else {}
        make_attack(name, **{k: yaml.safe_load(v) for k, v in options.items()})


def test_tune_help_states_the_grids_the_code_searches(capsys, monkeypatch):
    from metagg.tune import LOCAL_LRS, LOCAL_STEPS, SLOWMO_BETAS

    monkeypatch.setenv("COLUMNS", "200")
    code, out = run_main(capsys, "tune", "--help")
    assert code == 0
    text = " ".join(out.split())

    def grid(values) -> str:
        return "{" + ",".join(f"{v:g}".removeprefix("0") for v in values) + "}"

    assert f"SlowMo beta {grid(SLOWMO_BETAS)}" in text  # once printed as {.99..55}
    assert f"local lr {grid(LOCAL_LRS)}" in text and f"H {grid(LOCAL_STEPS)}" in text
    assert ".99..55" not in text
