"""The command line guards the user's work and time: every output path and the device are checked before anything
loads, nothing is replaced without --overwrite, a damaged checkpoint says what it is and what to do, long commands
show progress (off with --quiet) and say what they are about to read or sample, and an edit that backfires or a prompt
too long is warned about in the report and the table."""

from __future__ import annotations

import io
import json
import os

import pytest
import test_edit
import torch
from test_counterfact import FIXTURE

import fact_eval
from checkpoints import LAST_NAME, checkpoint_path, read_checkpoint
from data_classes.counterfact import read_counterfact
from edit import Editor, EditRequest
from errors import CheckpointError, DeviceError, EditRequestError
from fact_report import warning_lines
from preflight import check_device
from progress import ProgressBars

pytestmark = test_edit.pytestmark
tokenizer = test_edit.tokenizer  # fixtures
workspace, trained_run, edit_cli = test_edit.workspace, test_edit.trained_run, test_edit.edit_cli
REQUEST = '{"prompt": "The old museum", "target": "market square"}\n'


def _one_line_error(proc, *parts):
    """Exit status 2, one line on stderr naming every one of ``parts``, and nothing loaded or computed before it:
    no status line ("loading the editor ..." is said just before the checkpoint is read) and no table."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for part in parts:
        assert str(part) in proc.stderr, (part, proc.stderr)
    assert proc.stdout == ""


# -- outputs and the device, before anything loads ----------------------------------------------------------------
@pytest.mark.parametrize(
    "command, flag, what, message",
    [
        ("apply", "--report", "missing-dir", "does not exist"),
        ("apply", "--report", "existing-file", "--overwrite"),
        ("apply", "--report", "a-directory", "is a directory"),
        ("apply", "--patch-out", "existing-file", "not a directory"),
        ("apply", "--out", "existing-file", "not a directory"),
        ("apply", "--out", "missing-dir", "does not exist"),
        ("eval", "--out", "missing-dir", "does not exist"),
        ("eval", "--plot", "existing-file", "--overwrite"),
        ("eval-sequential", "--report", "missing-dir", "does not exist"),
        ("eval-sequential", "--plot", "existing-file", "--overwrite"),
    ],
)
def test_an_output_that_cannot_be_written_stops_before_anything_loads(
    trained_run, tmp_path, command, flag, what, message
):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(REQUEST)
    target = {
        "missing-dir": tmp_path / "no-such-dir" / "out",
        "existing-file": tmp_path / "earlier.json",
        "a-directory": tmp_path,
    }[what]
    if what == "existing-file":
        target.write_text("earlier results")
    extra = {"apply": ["--requests", requests], "eval": ["--path", FIXTURE, "--n", 2], "eval-sequential": ["--n", 2]}
    proc = edit_cli(command, "--archive", trained_run, *extra[command], flag, target)
    _one_line_error(proc, flag, target, message)
    if what == "existing-file":
        assert target.read_text() == "earlier results"  # not replaced


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available"), ("gpu", "not a device name")])
def test_a_device_this_machine_lacks_stops_before_anything_loads(trained_run, tmp_path, device, message):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(REQUEST)
    proc = edit_cli("apply", "--archive", trained_run, "--requests", requests, "--device", device)
    _one_line_error(proc, f"--device {device}", message)
    with pytest.raises(DeviceError, match="device cuda: CUDA is not available"):  # the Python API checks it first too
        Editor.from_archive("no-such-run", device="cuda")
    check_device("auto")
    check_device("cpu")


def test_eval_results_are_not_overwritten_without_overwrite(trained_run, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--archive", trained_run, "--path", FIXTURE, "--n", 2, "--out", out]
    assert edit_cli(*args).returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert set(before) == {"single.json", "summary.md"}
    _one_line_error(edit_cli(*args), "--out", "single.json", "summary.md", "--overwrite")
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    # another run into the same directory is refused too: its summary.md would replace this one's
    _one_line_error(edit_cli(*args, "--mode", "batched", "--n-edits", 2), "--out", "summary.md")
    proc = edit_cli(*args, "--overwrite", "--quiet")
    assert proc.returncode == 0 and proc.stderr == ""  # --quiet: no status lines, no bars
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]  # written through a temporary file


def test_apply_report_is_replaced_only_with_overwrite(trained_run, tmp_path):
    requests, report = tmp_path / "requests.jsonl", tmp_path / "report.json"
    requests.write_text(REQUEST)
    args = ["apply", "--archive", trained_run, "--requests", requests, "--report", report]
    proc = edit_cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loading the editor" in proc.stderr  # the status line, on stderr
    first = report.read_text()
    assert json.loads(first)["requests"][0]["target"] == "market square"
    _one_line_error(edit_cli(*args), "--report", report, "exists")
    assert report.read_text() == first
    assert edit_cli(*args, "--overwrite").returncode == 0


def test_new_patches_never_replace_saved_ones(tokenizer, tmp_path):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    result = editor.apply(test_edit.REQUESTS, mode="sequential")
    first = result.save_patches(str(tmp_path))
    assert [os.path.basename(f) for f in first] == [
        "patch-0000.safetensors",
        "patch-0001.safetensors",
        "patch-0002.safetensors",
    ]
    os.remove(first[1])  # a gap: counting the files would name the next one patch-0002, the one still there
    kept = (tmp_path / "patch-0002.safetensors").read_bytes()
    again = result.save_patches(str(tmp_path))
    assert [os.path.basename(f) for f in again][0] == "patch-0003.safetensors"
    assert (tmp_path / "patch-0002.safetensors").read_bytes() == kept


# -- checkpoints ----------------------------------------------------------------------------------------------------
def _damaged(run_dir, tmp_path, damage):
    best = (run_dir / "checkpoints" / "best.pt").read_bytes()
    if damage == "truncated-in-run":  # best.pt cut short next to a whole last.pt
        ck = tmp_path / "run" / "checkpoints"
        ck.mkdir(parents=True)
        (ck / "best.pt").write_bytes(best[: len(best) // 2])
        (ck / LAST_NAME).write_bytes((run_dir / "checkpoints" / LAST_NAME).read_bytes())
        return str(ck / "best.pt")
    path = tmp_path / "editor.pt"
    if damage == "truncated":
        path.write_bytes(best[: len(best) - 100])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":  # e.g. the run's results.json given by mistake
        path.write_text((run_dir / "results.json").read_text())
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * 8)
    return str(path)


@pytest.mark.parametrize(
    "damage, says, todo",
    [
        ("truncated", "is truncated", "copy it again"),
        ("truncated-in-run", "is truncated", "or pass {run}/checkpoints/last.pt"),
        ("empty", "is empty (0 bytes)", "copy it again"),
        ("text", "is a text file (it starts with '{", "pass the run directory of a training run or its checkpoints/"),
        ("garbage", "is not a file that torch.save wrote", "pass the run directory"),
    ],
)
def test_a_damaged_checkpoint_says_what_it_is_and_what_to_do(trained_run, tmp_path, damage, says, todo):
    path = _damaged(trained_run, tmp_path, damage)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert f"{path} could not be read as a checkpoint: it {says}" in message
    assert todo.format(run=tmp_path / "run") in message
    assert "weights_only" not in message and "\n" not in message  # not torch's advice, which is wrong here


@pytest.mark.parametrize(
    "where, todo",
    [
        ("nowhere", "No such file or directory: pass the run directory of a training run or its checkpoints/best.pt"),
        ("empty-dir", "is a directory without checkpoints"),
        ("parent-of-runs", "It holds the training runs {parent}/run: pass one of them"),
        ("checkpoints-dir", "Pass the run directory {parent}/run or {parent}/run/checkpoints/best.pt"),
        ("before-first-validation", "continue its training with python -m run resume={parent}/run"),
    ],
)
def test_a_path_without_a_checkpoint_says_what_to_pass(trained_run, tmp_path, where, todo):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    if where != "before-first-validation":
        (run / "checkpoints" / "best.pt").write_bytes((trained_run / "checkpoints" / "best.pt").read_bytes())
    else:
        (run / "checkpoints" / LAST_NAME).write_bytes((trained_run / "checkpoints" / LAST_NAME).read_bytes())
    given = {
        "nowhere": tmp_path / "no-such-run",
        "empty-dir": tmp_path / "empty",
        "parent-of-runs": tmp_path,
        "checkpoints-dir": run / "checkpoints",
        "before-first-validation": run,
    }[where]
    if where == "empty-dir":
        given.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found") as info:
        checkpoint_path(str(given))
    assert todo.format(parent=tmp_path) in str(info.value)


def test_a_text_file_as_archive_is_one_line_from_the_command_line(trained_run, tmp_path):
    text = tmp_path / "results.json"
    text.write_text((trained_run / "results.json").read_text())
    requests = tmp_path / "requests.jsonl"
    requests.write_text(REQUEST)
    proc = edit_cli("apply", "--archive", text, "--requests", requests, "--quiet")
    _one_line_error(proc, text, "is a text file", "pass the run directory")


# -- what a command is about to do, and its progress ----------------------------------------------------------------
def _as_counterfact_editor(run_dir, tmp_path):
    """The trained run's editor, its configuration saying it was trained on the embedded CounterFact set."""
    ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    meta = json.loads(ckpt["meta"])
    meta["config"]["task"], meta["config"]["data"]["path"] = "counterfact", None
    ckpt["meta"] = json.dumps(meta)
    path = tmp_path / "cf-editor.pt"
    torch.save(ckpt, path)
    return path


def test_eval_sequential_draws_from_the_editors_own_task_and_says_so(trained_run, tmp_path):
    archive, cache = _as_counterfact_editor(trained_run, tmp_path), tmp_path / "cache"
    args = ["eval-sequential", "--archive", archive, "--n", 3, "--checkpoints", "1,3", "--n-loc", 2]
    proc = edit_cli(*args, "--cache-dir", cache, "--plot", tmp_path / "seq.png", "--report", tmp_path / "seq.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 edits from the validation split of the counterfact data the editor was trained on" in proc.stderr
    assert (cache / "data" / "counterfact").is_dir()
    assert not (cache / "data" / "gen").exists()  # no gen set sampled for a CounterFact editor
    report = json.loads((tmp_path / "seq.json").read_text())
    assert "counterfact" in report["source"] and [r["n_edits"] for r in report["checkpoints"]] == [1, 3]
    quiet = edit_cli(*args, "--cache-dir", cache, "--plot", tmp_path / "seq2.png", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_apply_and_eval_sequential_report_their_progress(tokenizer):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    seen = {}

    def progress(stage, done, total):
        seen.setdefault(stage, []).append((done, total))

    editor.apply(test_edit.REQUESTS, mode="sequential", progress=progress)
    assert list(seen) == ["measuring before the edit", "edits", "measuring after the edit"]
    assert seen["edits"][-1] == (3, 3) and seen["measuring after the edit"][-1] == (3, 3)
    assert [d for d, _ in seen["edits"]] == [0, 1, 2, 3]


def test_the_python_api_shows_progress_bars_by_default(tokenizer, monkeypatch, tmp_path):
    import editing

    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    seen = {}
    monkeypatch.setattr(editing, "eval_sequential", lambda editor, **options: seen.update(options) or {})
    editor.eval_sequential(n=2)
    assert isinstance(seen["progress"], ProgressBars)

    calls = []

    class Recorder:
        def __call__(self, stage, done, total):
            calls.append(stage)

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(fact_eval, "ProgressBars", Recorder)
    fact_eval.evaluate_dataset(editor, [("single", 1)], path=str(FIXTURE), split="all", n=2, cache_dir=str(tmp_path))
    assert {"unedited model", "edits"} <= set(calls) and calls[-1] == "closed"


def test_progress_bars_show_unless_disabled(capsys):
    for disable, shown in ((False, True), (True, False)):
        bars = ProgressBars(disable=disable)
        bars("edits", 1, 4)
        bars("edits", 4, 4)
        bars.close()
        assert ("edits" in capsys.readouterr().err) == shown


def test_progress_goes_to_a_log_file_as_lines_at_most_every_interval():
    """Off a terminal (a log file, a batch job) the bars become plain lines: one at a stage's first call and one at
    its end, and between them at most one every ``interval`` seconds, each with the count, the rate and the time
    left."""
    log = io.StringIO()  # not a terminal
    bars = ProgressBars(interval=3600, stream=log)
    for done in range(1, 5):
        bars("edits", done, 4)
    bars("unedited model", 1, 2)
    bars.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("edits: 1/4 (25%)"), lines
    assert lines[1].startswith("edits: 4/4 (100%)") and "/s" in lines[1] and "left" not in lines[1], lines
    assert lines[2].startswith("unedited model: 1/2 (50%)"), lines
    log = io.StringIO()
    bars = ProgressBars(interval=0, stream=log)
    for done in range(1, 5):
        bars("edits", done, 4)
    assert len(log.getvalue().splitlines()) == 4
    log = io.StringIO()
    quiet = ProgressBars(disable=True, stream=log)
    quiet("edits", 4, 4)
    assert log.getvalue() == ""


# -- warnings in the report and the table -------------------------------------------------------------------------
def _backwards_editor(tokenizer):
    """An editor whose step goes against its own gradient (a negative step size): its edits make the target less
    likely, the case the warning is for."""
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)
    with torch.no_grad():
        for p in editor.alg.step_size_parameters():
            p.neg_()
    return editor


def test_an_edit_that_makes_its_target_less_likely_is_warned_about(tokenizer):
    editor = _backwards_editor(tokenizer)
    result = editor.apply(test_edit.REQUESTS[:1])
    row = result.report[0]
    assert row["logp_after"] < row["logp_before"]
    assert any("made its own target less likely" in w for w in row["warnings"])
    assert "warning: request 1: the edit made its own target less likely" in result.table()
    good = test_edit.editor_with_statistics("gpt2", tokenizer).apply(test_edit.REQUESTS[:1])
    assert good.report[0]["logp_after"] > good.report[0]["logp_before"] and good.report[0]["warnings"] == []
    assert "warning" not in good.table()

    cases = read_counterfact(FIXTURE)[:2]
    run = fact_eval.evaluate(editor, cases, "single")
    assert run["summary"]["target_less_likely"] == sum(bool(c["warnings"]) for c in run["cases"]) > 0
    (line,) = warning_lines([run])
    assert line.startswith(f"after, single: {run['summary']['target_less_likely']} of 2 edits made their own target")


def test_a_long_prompt_is_warned_about_and_one_beyond_the_context_refused(tokenizer, monkeypatch):
    editor = test_edit.editor_with_statistics("gpt2", tokenizer)  # a context of 64 tokens
    long = EditRequest("The old museum of the river city is " * 3, "castle")
    result = editor.apply([long], max_prompt_tokens=10)
    (warning,) = result.report[0]["warnings"]
    assert "the prompt is" in warning and "above --max-prompt-tokens 10" in warning
    assert "warning: request 1: the prompt is" in result.table()
    assert editor.apply([long]).report[0]["warnings"] == []  # under the default limit

    def no_edit(*args, **kwargs):
        raise AssertionError("an edit was computed")

    monkeypatch.setattr(Editor, "edit_patch", no_edit)
    too_long = EditRequest("The old museum of the river city is " * 10, "castle")
    with pytest.raises(EditRequestError, match="request 2: the prompt is .* longer than the model's context of 64"):
        editor.apply([test_edit.REQUESTS[0], too_long])

    case = dict(read_counterfact(FIXTURE)[0], prompt="{} " + "and the old museum " * 20)
    with pytest.raises(EditRequestError, match=f"case {case['case_id']}: rewrite prompt is .* context of 64"):
        fact_eval.PreparedCases(editor, [case])
    prepared = fact_eval.PreparedCases(editor, read_counterfact(FIXTURE)[:2], max_prompt_tokens=3)
    assert prepared.warnings and "--max-prompt-tokens 3" in prepared.warnings[0]


def test_the_command_line_prints_the_warnings_and_writes_them_to_the_report(trained_run, tmp_path):
    requests, report = tmp_path / "requests.jsonl", tmp_path / "report.json"
    requests.write_text(REQUEST)
    args = ["--requests", requests, "--report", report, "--max-prompt-tokens", 2]
    proc = edit_cli("apply", "--archive", trained_run, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: request 1: the prompt is" in proc.stdout
    assert "above --max-prompt-tokens 2" in json.loads(report.read_text())["requests"][0]["warnings"][0]
