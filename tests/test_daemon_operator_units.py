"""Pure parts of the operator features: allocation order, ages, progress, the 80-column table."""

from __future__ import annotations

from guardian.daemon import devices, knobs, view
from guardian.daemon.gpu import Gpus
from guardian.daemon.records import Attempt, JobSpec, JobState


def spec(name: str, gpus: int | None = None, priority: int = 0, created: float = 0.0) -> JobSpec:
    return JobSpec(
        name=name,
        argv=["x"],
        cwd="/",
        run_dir="/r",
        env={},
        owner_uid=0,
        gpus=gpus,
        priority=priority,
        created=created,
    )


def running(name: str, devs: list[str]) -> JobState:
    return JobState(
        name=name, state="running", attempts=[Attempt(n=1, boot_id="b", started=0.0, devices=devs)]
    )


def allocator(devs: str, **kw) -> devices.Allocator:
    a = devices.Allocator(Gpus(), knobs.Knobs(devices=devs, **kw))
    a.refresh()
    return a


def test_queue_order_is_priority_then_fifo():
    specs = {"a": spec("a", created=3), "b": spec("b", created=1), "c": spec("c", priority=2, created=9)}
    assert devices.queue_order(specs, ["a", "b", "c"]) == ["c", "b", "a"]


def test_allocation_never_hands_out_a_held_device_and_a_blocked_job_blocks_later_gpu_jobs():
    a = allocator("0,1,2")
    jobs = {"x": running("x", ["1"])}
    assert a.wait_reason(spec("big", gpus=3), jobs) == "queued: needs 3 GPU(s), 2 free of 3 (held by x)"
    later = a.wait_reason(spec("small", gpus=1), jobs)
    assert later is not None and later.startswith("queued behind big")
    assert a.wait_reason(spec("cpu"), jobs) is None, "a job without GPUs is not held up"
    a.new_pass()
    assert a.wait_reason(spec("small", gpus=2), jobs) is None
    assert a.take(spec("small", gpus=2), jobs) == ["0", "2"]


def test_max_concurrent_and_too_big():
    a = allocator("0", max_concurrent=1)
    assert "max-concurrent 1" in (a.wait_reason(spec("y"), {"x": running("x", [])}) or "")
    assert "needs 2 GPU(s) but the inventory (configured) has 1: 0" in (a.too_big(spec("z", gpus=2)) or "")


def test_inventory_falls_back_to_cuda_visible_devices():
    inv = devices.discover(Gpus(), knobs.Knobs(), env={"CUDA_VISIBLE_DEVICES": "2, 3"})
    assert inv.devices == ["2", "3"] and inv.source == "CUDA_VISIBLE_DEVICES"
    assert devices.discover(Gpus(), knobs.Knobs(), env={}).devices == []


def test_visible_devices_for_gpu_cpu_and_unmanaged_jobs():
    assert devices.visible_devices(spec("a", gpus=2), ["0", "3"]) == "0,3"
    cpu = spec("b")
    cpu.cpu_only = True
    assert devices.visible_devices(cpu, []) == ""
    assert devices.visible_devices(spec("c"), []) is None


def test_human_ages():
    assert [view.human_age(s) for s in (None, 5, 192, 7500, 3 * 86400 + 4 * 3600)] == [
        "-",
        "5s",
        "3m12s",
        "2h05m",
        "3d04h",
    ]


def test_progress_rate_and_eta():
    r = view.rate(step=300, beat_time=110.0, ck_step=100, ck_time=10.0)
    assert r == 2.0
    done, eta = view.progress({"step": 300, "steps_total": 1000}, r)
    assert done == 0.3 and eta == 350.0
    assert view.progress({"step": 5}, r) == (None, None), "no length known: no progress, no ETA"
    assert view.progress({"step": "x", "steps_total": -1}, r) == (None, None), "hostile values ignored"


def test_table_fits_80_columns_and_names_what_is_not_running():
    jobs = [
        {
            "name": "a-very-long-job-name-indeed",
            "state": "running",
            "attempts": 12,
            "epoch": 3,
            "step": 123456,
            "progress": 0.5,
            "eta": 4000,
            "steps_per_sec": 12.5,
            "checkpoint_age": 90,
            "devices": ["0", "1"],
            "reason": "r",
        },
        {
            "name": "q",
            "state": "pending",
            "attempts": 0,
            "reason": "queued: needs 1 GPU(s), 0 free of 2 (held by x)",
        },
    ]
    lines = view.table(jobs, 80)
    assert all(len(line) <= 80 for line in lines)
    assert "50%" in lines[1] and "running" in lines[1] and "1h06m" in lines[1]
    assert any(line.startswith("  q: queued") for line in lines)
    wide = view.table(jobs, 160)
    assert "WHY" in wide[0] and "queued: needs 1 GPU(s)" in wide[2]


def test_journal_notifies_hung_gave_up_held_and_done(tmp_path):
    import json
    import os

    from guardian.daemon import notify
    from guardian.daemon import registry as reg
    from guardian.daemon.journal import Journal

    out = tmp_path / "out"
    h = reg.Home(str(tmp_path / "home")).ensure()
    os.makedirs(h.job_dir("j"))
    k = knobs.Knobs(notify=f"cat >> {out}", notify_interval=3600, notify_timeout=30)
    j = Journal(h, notify.Notifier(k, {"j": spec("j")}))
    st = JobState(name="j", state="running")
    j.event(st, "hang", "no heartbeat for 300 s")
    j.set_state(st, "failed", "gave up: 3 failures without a newer valid checkpoint")
    j.set_state(st, "held", "GPU x disappeared")
    j.set_state(st, "backoff", "restart in 10 s")  # not worth waking anyone
    j.set_state(st, "done", "exited 0 and run.json says finished")
    j.close()
    assert [json.loads(line)["event"] for line in out.read_text().splitlines()] == [
        "hung",
        "gave-up",
        "held",
        "done",
    ]


def test_a_failed_nvml_query_keeps_the_inventory():
    class Flaky(Gpus):
        answer: list[str] | None = ["GPU-a", "GPU-b"]

        @property
        def available(self) -> bool:
            return True

        def inventory(self) -> list[str] | None:
            return self.answer

    g = Flaky()
    a = devices.Allocator(g, knobs.Knobs())
    assert a.refresh() == [] and a.inventory.devices == ["GPU-a", "GPU-b"]
    g.answer = None
    assert a.refresh() == [] and a.inventory.devices == ["GPU-a", "GPU-b"], "not every device lost"
    g.answer = ["GPU-b"]
    assert a.refresh() == ["GPU-a"]
