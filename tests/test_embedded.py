"""Tests of the shared builder of the embedded edit sets (data_classes/embedded.py): built once, rebuilt when a
parameter changes, nothing left behind by a failed build, a damaged cache refused in one line, and the cache keys
that existing caches are stored under."""

from __future__ import annotations

import dataclasses
import json
import logging
from types import SimpleNamespace

import pytest

from config_schema import DataConfig
from data_classes import DataError, counterfact, fc, gen, qa
from data_classes import embedded as embedded_module
from data_classes.base import read_jsonl
from data_classes.embedded import EmbeddedSet, data_cache_dir

ROWS = {"train": [{"q": "a", "n": 1}, {"q": "b", "n": 2}], "validation": [{"q": "ü", "n": 3}]}


class CountingBuild:
    """A build function that counts its calls and returns ROWS (or raises ``fail``)."""

    def __init__(self, fail: Exception | None = None):
        self.calls, self.fail = 0, fail

    def __call__(self, progress):
        self.calls += 1
        progress(1, 2)
        if self.fail is not None:
            raise self.fail
        progress(2, 2)
        return ROWS


def read_rows(path):
    return [obj for _, _, obj in read_jsonl(path)]


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_built_once_and_read_back(tmp_path):
    build = CountingBuild()
    first = EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(build)
    stamp = first.file("train").stat().st_mtime_ns
    again = EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(build)
    assert build.calls == 1 and again.dir == first.dir and first.file("train").stat().st_mtime_ns == stamp
    assert {s: again.read(s, read_rows) for s in ROWS} == ROWS
    assert files_under(first.dir) == ["params.json", "train.jsonl", "validation.jsonl"]
    assert json.loads((first.dir / "params.json").read_text()) == {"seed": 0}
    assert "ü" in first.file("validation").read_text(encoding="utf-8")  # written as text, not as \u escapes


def test_rebuilt_when_a_parameter_changes(tmp_path):
    build = CountingBuild()
    a = EmbeddedSet("toy", {"seed": 0, "n": 5}, str(tmp_path)).ensure(build)
    b = EmbeddedSet("toy", {"seed": 0, "n": 6}, str(tmp_path)).ensure(build)
    c = EmbeddedSet("toy", {"n": 5, "seed": 0}, str(tmp_path)).ensure(build)  # the same parameters, other order
    assert build.calls == 2 and a.dir != b.dir and c.dir == a.dir
    assert a.dir.parent == b.dir.parent == tmp_path / "data" / "toy"


def test_a_missing_split_file_rebuilds_the_set(tmp_path):
    build = CountingBuild()
    embedded = EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(build)
    embedded.file("validation").unlink()
    embedded.ensure(build)
    assert build.calls == 2 and embedded.read("validation", read_rows) == ROWS["validation"]


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(CountingBuild(fail=KeyboardInterrupt()))
    assert files_under(tmp_path) == []
    # The disk fills up at the last file (params.json and train are written): what was written goes again.
    write = embedded_module.atomic_write_text

    def full_disk(text, path):
        if path.endswith("validation.jsonl"):
            raise OSError(28, "No space left on device")
        write(text, path)

    monkeypatch.setattr(embedded_module, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(CountingBuild())
    assert files_under(tmp_path) == []
    monkeypatch.setattr(embedded_module, "atomic_write_text", write)
    build = CountingBuild()
    EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(build)  # and the next run builds it
    assert build.calls == 1


def test_a_damaged_cache_file_is_refused_in_one_line_naming_it(tmp_path):
    """Refused, not rebuilt: the message names the file and the directory to delete to rebuild the set."""
    build = CountingBuild()
    embedded = EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(build)
    path = embedded.file("train")
    path.write_text(path.read_text()[:15])  # cut short in the middle of the first line
    embedded.ensure(build)
    assert build.calls == 1  # every split file is there: not rebuilt
    with pytest.raises(DataError) as e:
        embedded.read("train", read_rows)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "not valid JSON" in message
    assert "delete that directory to rebuild it" in message and str(embedded.dir) in message


def test_the_progress_hook(tmp_path, caplog):
    seen = []
    EmbeddedSet("toy", {"seed": 0}, str(tmp_path)).ensure(CountingBuild(), progress=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 2), (2, 2)]
    with caplog.at_level(logging.INFO, logger="data_classes.embedded"):
        EmbeddedSet("toy", {"seed": 1}, str(tmp_path)).ensure(CountingBuild())
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Building the embedded toy set: 1 of 2") for m in lines), lines
    assert any(m.startswith("Built the embedded toy set (2 train, 1 validation examples)") for m in lines), lines


# -- the real sets ---------------------------------------------------------------------------------------------
def data_cfg(**kw):
    cfg = dataclasses.asdict(DataConfig())
    cfg.update(kw)
    return SimpleNamespace(**cfg)


def test_the_cache_keys_of_existing_caches_do_not_move():
    """Users have sets cached under these keys (``<cache_dir>/data/<task>/<key>``): a change of a set's parameters
    or of the hash would build every set again."""
    key = lambda task, params: data_cache_dir("/c", task, params).name  # noqa: E731
    assert key("qa", qa.embedded_params(data_cfg(), 0)) == "de93fae60681"
    assert key("fc", fc.embedded_params(data_cfg(), 0)) == "a5542d1beafb"
    assert key("fc", fc.embedded_params(data_cfg(max_countries=12), 0)) == "633319079b42"
    assert key("counterfact", counterfact.embedded_params(data_cfg(), 0)) == "3d85d27cc27a"
    small = data_cfg(max_documents=10, max_passages=40, val_fraction=0.25)
    assert key("gen", gen.embedded_params(small, 0, "tiny-gpt2")) == "a7f53303333d"


def test_a_damaged_embedded_set_is_refused_by_its_data_set(tmp_path):
    """The qa set's cached file cut short: the data set refuses it in one line that says how to rebuild it."""
    embedded = qa.ensure_embedded(str(tmp_path), data_cfg(), 0)
    path = embedded.file("validation")
    path.write_text(path.read_text()[:-40])
    with pytest.raises(DataError, match="delete that directory to rebuild it") as e:
        qa.QADataset(SimpleNamespace(pad_token_id=0, eos_token_id=0), data_cfg(), "validation", 0, str(tmp_path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
