"""Retraining on its own (lib/lifecycle/autotrain.py): the decision, the persisted counters, and a
real server that starts a training when the second final label is saved."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from conftest import Server, small_site
from lib.lifecycle.autotrain import (STATE_FILENAME, AutoTrainer, AutoTrainSettings, AutoTrainState, decide, load_state,
                           record_run_start, save_state)
from lib.lifecycle.splits import assign, split_path
from test_server import put_label  # our label values, no label_info

S = AutoTrainSettings(min_labels=2, new_labels=5)


# --- the decision -------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, final, new, runs, busy, periodic, last_start, start",
    [
        (S, 1, 1, 0, False, False, None, False),  # below the minimum
        (S, 2, 2, 0, False, False, None, True),  # first training
        (S, 2, 2, 0, True, False, None, False),  # one already running
        (S, 3, 1, 1, False, False, 0.0, False),  # 1 new < 5
        (S, 7, 5, 1, False, False, 0.0, True),  # 5 new
        (S, 7, 5, 1, True, False, 0.0, False),  # 5 new but busy: wait for the run to end
        (AutoTrainSettings(enabled=False, min_labels=2), 9, 9, 0, False, False, None, False),
        # periodic: anything new once the interval has passed since the last start
        (AutoTrainSettings(min_labels=2, interval_minutes=10), 3, 1, 1, False, True, 1000.0, False),
        (AutoTrainSettings(min_labels=2, interval_minutes=10), 3, 1, 1, False, True, 1000.0 - 601, True),
        (AutoTrainSettings(min_labels=2, interval_minutes=10), 3, 0, 1, False, True, 0.0, False),  # nothing new
        (AutoTrainSettings(min_labels=2, interval_minutes=10), 3, 1, 1, False, False, 0.0, False),  # label save
        (S, 3, 1, 1, False, True, 0.0, False),  # interval 0: no periodic retrain
        (AutoTrainSettings(min_labels=5, interval_minutes=1), 4, 4, 0, False, True, None, False),  # below min
    ],
)
def test_decide(settings, final, new, runs, busy, periodic, last_start, start):
    d = decide(settings, final, new, runs, busy, periodic=periodic, last_start=last_start, now=1000.0)
    assert d.start is start, d.reason


def test_settings_from_conf_and_defaults():
    assert AutoTrainSettings.from_conf({}) == AutoTrainSettings(True, 20, 5, 0.0)
    s = AutoTrainSettings.from_conf({"auto_train": "false", "auto_train_min_labels": "2",
                                     "auto_train_new_labels": "3", "auto_train_interval": "1.5"})
    assert s == AutoTrainSettings(False, 2, 3, 1.5)
    for bad in ({"auto_train": "maybe"}, {"auto_train_min_labels": "0"}, {"auto_train_interval": "-1"}):
        with pytest.raises(ValueError):
            AutoTrainSettings.from_conf(bad)


def test_state_round_trip_and_unreadable_file(tmp_path):
    path = str(tmp_path / STATE_FILENAME)
    assert load_state(path) == AutoTrainState()
    state = AutoTrainState(2, ["a", "b"], 123.5, 1, "first")
    save_state(path, state)
    assert load_state(path) == state and not (tmp_path / f"{STATE_FILENAME}.partial").exists()
    (tmp_path / STATE_FILENAME).write_text("{not json")
    assert load_state(path) == AutoTrainState()


class FakeTrainer:
    """A stand-in for MONAI Label's train tasks: one at a time, finished by the test."""

    def __init__(self):
        self.labeled, self.starts, self.running = [], 0, False
        self.done = threading.Event()

    def start(self):
        if self.running:
            return False
        self.running, self.starts = True, self.starts + 1
        self.done.clear()
        return True

    def finish(self):
        self.running = False
        self.done.set()

    def make(self, model_dir, settings=S):
        return AutoTrainer(str(model_dir), settings, lambda: self.labeled, lambda: self.running, self.start,
                           wait_finished=self.done.wait)


def test_labels_saved_during_a_run_count_for_the_next(tmp_path):
    fake = FakeTrainer()
    auto = fake.make(tmp_path)
    fake.labeled = ["a"]
    assert not auto.check().start and fake.starts == 0
    fake.labeled = ["a", "b"]
    assert auto.check().start and fake.starts == 1
    for i in range(5):  # 5 new labels while the run goes on: nothing starts now...
        fake.labeled = fake.labeled + [f"n{i}"]
        assert not auto.check().start
    assert fake.starts == 1
    fake.finish()  # ... the check after the run starts the next one

    def saved_state():
        return json.loads((tmp_path / STATE_FILENAME).read_text())

    # the trainer starts inside the check, the counters are written just after: wait for both
    assert wait_until(lambda: fake.starts == 2 and saved_state()["runs_started"] == 2, timeout=30), fake.starts
    assert fake.starts == 2
    state = saved_state()
    assert state["runs_started"] == 2 and state["final_labels_at_last_start"] == 7
    # a restart reads the same counters
    again = fake.make(tmp_path)
    assert again.state == auto.state and again.info()["new_final_labels"] == 0


def test_relabelling_an_image_is_not_a_new_label(tmp_path):
    fake = FakeTrainer()
    auto = fake.make(tmp_path, AutoTrainSettings(min_labels=1, new_labels=1))
    fake.labeled = ["a"]
    assert auto.check().start
    fake.finish()
    # the check after the run comes from its own thread: wait for it, or it could see "b" below
    assert wait_until(lambda: (auto.info()["last_check"] or {}).get("trigger") == "after run"), auto.info()
    assert not auto.check().start  # "a" saved again: nothing new
    fake.labeled = ["a", "b"]
    assert auto.check().start


def wait_until(condition, timeout=30.0):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_run_started_by_a_train_request_moves_the_counters(tmp_path):
    fake = FakeTrainer()
    auto = fake.make(tmp_path)
    fake.labeled = ["a", "b"]
    assert auto.check().start  # automatic run 1 ...
    record_run_start(str(tmp_path), ["a", "b"])  # ... whose train process only claims it
    assert auto.state.runs_started == 1
    fake.finish()
    assert wait_until(lambda: not auto._waiting.locked())  # the check after the run: nothing new
    fake.labeled = ["a", "b", "c", "d", "e", "f"]
    fake.running = True  # an annotator's train request: the train process counts it
    fake.done.clear()
    record_run_start(str(tmp_path), fake.labeled)
    assert auto.state.runs_started == 2 and auto.state.last_reason == "train request"
    assert auto.info()["new_final_labels"] == 0 and auto.info()["final_labels_at_last_start"] == 6
    fake.labeled = fake.labeled + ["g", "h", "i", "j", "k"]  # saved during that run: refused (busy) ...
    assert not auto.check().start
    fake.finish()  # ... and counted for the run after it
    assert wait_until(lambda: fake.starts == 2 and auto.state.runs_started == 3)  # state follows the start
    assert auto.state.final_labels_at_last_start == 11


def test_test_images_are_not_counted(tmp_path):
    fake = FakeTrainer()
    auto = fake.make(tmp_path, AutoTrainSettings(min_labels=2, new_labels=1))
    assign(split_path(str(tmp_path)), {"test": ["t1", "t2"]})
    fake.labeled = ["a", "t1", "t2"]
    assert not auto.check().start and auto.info()["final_labels"] == 1
    state = record_run_start(str(tmp_path), ["a", "b", "t1"])
    assert state.labeled_at_last_start == ["a", "b"]


def test_off_starts_nothing(tmp_path):
    fake = FakeTrainer()
    auto = fake.make(tmp_path, AutoTrainSettings(enabled=False, min_labels=1))
    fake.labeled = ["a", "b", "c"]
    assert not auto.check().start and fake.starts == 0
    assert not (tmp_path / STATE_FILENAME).exists()


# --- a real server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = small_site(tmp_path_factory, "autotrain", 3)
    site["conf"] = conf = {"auto_train_min_labels": 2, "auto_train_new_labels": 5}
    site["server"] = Server(site["studies"], site["model_dir"], workdir=site["root"], conf=conf)
    yield site
    site["server"].stop()


def auto_info(url):
    return requests.get(f"{url}/info/", timeout=30).json()["auto_train"]


def wait_for_check(url, trigger, timeout=120):
    """The server's next auto-train check whose trigger starts with ``trigger`` (as /info reports
    it): waits on what the server says it did, not on a guess of how long it takes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        last = auto_info(url)["last_check"]
        if last and last["trigger"].startswith(trigger):
            return last
        time.sleep(0.5)
    raise TimeoutError(f"no auto-train check '{trigger}' within {timeout} s: {auto_info(url)}")


def train_tasks(url):
    r = requests.get(f"{url}/train/", params={"all": "true"}, timeout=10)
    return r.json() if r.status_code == 200 else []


def save(site, case_id):
    r = put_label(site["server"].url, case_id, site["reference"] / f"{case_id}_label.nii.gz")
    assert r.status_code == 200, r.text


def test_info_shows_settings(site):
    info = auto_info(site["server"].url)
    assert info["enabled"] is True and info["min_labels"] == 2 and info["new_labels"] == 5
    assert info["interval_minutes"] == 0 and info["runs_started"] == 0 and info["final_labels"] == 0


def test_one_final_label_starts_nothing(site):
    url = site["server"].url
    save(site, site["cases"][0])
    check = auto_info(url)["last_check"]  # the save itself runs the check
    assert check["trigger"] == f"label {site['cases'][0]}" and check["started"] is False, check
    assert requests.get(f"{url}/train/", timeout=10).status_code == 404  # no train task at all
    info = auto_info(url)
    assert info["final_labels"] == 1 and info["runs_started"] == 0


def test_second_final_label_starts_a_training(site):
    url = site["server"].url
    save(site, site["cases"][1])
    deadline = time.time() + 30
    while not (tasks := train_tasks(url)) and time.time() < deadline:
        time.sleep(0.5)
    assert len(tasks) == 1, tasks
    assert tasks[0]["status"] == "RUNNING"
    info = auto_info(url)
    assert info["runs_started"] == 1 and info["final_labels_at_last_start"] == 2 and info["last_start"]


def test_third_label_and_train_request_during_the_run_start_nothing(site):
    server = site["server"]
    url = server.url
    assert train_tasks(url)[-1]["status"] == "RUNNING"  # the run of the previous test is going on
    save(site, site["cases"][2])
    r = requests.post(f"{url}/train/spine", json={}, timeout=60)  # Slicer's "Train" button
    assert r.status_code == 429, r.text
    deadline = time.time() + 600
    while time.time() < deadline:
        tasks = train_tasks(url)
        assert sum(t["status"] in ("SUBMITTED", "RUNNING") for t in tasks) <= 1
        if tasks and tasks[-1]["status"] not in ("SUBMITTED", "RUNNING"):
            break
        time.sleep(1)
    check = wait_for_check(url, "after run")  # the check after the run: 1 new label < 5, nothing starts
    assert check["started"] is False, check
    tasks = train_tasks(url)
    assert len(tasks) == 1, tasks
    assert tasks[0]["status"] == "DONE", "\n".join(tasks[0].get("details", []))
    info = auto_info(url)
    assert info["runs_started"] == 1 and info["final_labels"] == 3 and info["new_final_labels"] == 1


def test_restart_keeps_the_counters(site):
    before = auto_info(site["server"].url)
    site["server"].stop()
    state = json.loads((site["model_dir"] / STATE_FILENAME).read_text())
    assert state["runs_started"] == 1 and state["final_labels_at_last_start"] == 2
    site["server"] = Server(site["studies"], site["model_dir"], workdir=site["root"], conf=site["conf"])
    url = site["server"].url
    after = auto_info(url)
    for key in ("runs_started", "final_labels_at_last_start", "last_start", "final_labels", "new_final_labels"):
        assert after[key] == before[key], key
    check = wait_for_check(url, "start-up")  # 1 new label < 5: the start-up check starts nothing
    assert check["started"] is False, check
    assert requests.get(f"{url}/train/", timeout=10).status_code == 404
