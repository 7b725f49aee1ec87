"""The on-demand scheduler's decisions, with explicit memory and times."""

from __future__ import annotations

from dataclasses import replace

from inference_node.ondemand.policy import (
    InstanceView,
    JoinLoad,
    Load,
    LoadMode,
    Memory,
    Phase,
    Ready,
    Refuse,
    Wait,
    decide_load,
    next_ttl_deadline,
    ttl_expired,
    ttl_left,
)

OD, ALWAYS = LoadMode.ON_DEMAND, LoadMode.ALWAYS
GPU = "GPU-a"


def view(name: str, mib: float, phase: Phase = Phase.UNLOADED, *, mode: LoadMode = OD,
         busy: bool = False, last_use: float | None = None, ttl_s: float = 600.0,
         dev: str = GPU) -> InstanceView:
    return InstanceView(name, mode, phase, {dev: mib}, busy, last_use, ttl_s)


def test_loads_at_once_when_it_fits() -> None:
    views = [view("qwen", 6000)]
    d = decide_load("qwen", views, Memory({GPU: 8000}, {GPU: 24000}), now=0.0)
    assert d == Load((), "needs 6,000 MiB, 8,000 MiB free")


def test_ready_and_loading_are_not_loaded_again() -> None:
    mem = Memory({GPU: 0})
    assert isinstance(decide_load("a", [view("a", 10, Phase.READY)], mem, 0.0), Ready)
    assert isinstance(decide_load("a", [view("a", 10, Phase.LOADING)], mem, 0.0), JoinLoad)


def test_evicts_idle_on_demand_least_recently_used_first_and_only_what_must_go() -> None:
    views = [view("qwen", 9104),
             view("old", 4000, Phase.READY, last_use=10.0),
             view("newer", 4000, Phase.READY, last_use=50.0),
             view("newest", 4000, Phase.READY, last_use=90.0)]
    d = decide_load("qwen", views, Memory({GPU: 3210}), now=100.0)
    assert isinstance(d, Load)
    # 3,210 + 4,000 is short; + 4,000 more fits: "newest" stays
    assert d.evict == ("old", "newer")
    assert d.evict_reason == "evicted for qwen: needs 9,104 MiB, 3,210 MiB free"


def test_never_evicts_always_or_busy_instances_and_waits_for_the_busy_one() -> None:
    views = [view("qwen", 9000),
             view("pinned", 9000, Phase.READY, mode=ALWAYS, last_use=0.0),
             view("coder", 9000, Phase.READY, busy=True, last_use=0.0)]
    d = decide_load("qwen", views, Memory({GPU: 1000}), now=5.0, waiting_since=5.0,
                    evict_wait_s=30.0)
    assert d == Wait("waiting for coder to finish its task (9,000 MiB needed)", ("coder",))
    # still waiting at 34.9 s, refused at 35 s
    assert isinstance(decide_load("qwen", views, Memory({GPU: 1000}), 34.9, 5.0, 30.0), Wait)
    refused = decide_load("qwen", views, Memory({GPU: 1000}), 35.0, 5.0, 30.0)
    assert isinstance(refused, Refuse) and "evict_wait_s" in refused.reason
    # once the task is over, coder is idle and goes
    idle = [views[0], views[1], replace(views[2], busy=False, last_use=36.0)]
    d = decide_load("qwen", idle, Memory({GPU: 1000}), now=36.0)
    assert isinstance(d, Load) and d.evict == ("coder",)


def test_refuses_when_only_always_instances_hold_the_memory() -> None:
    views = [view("qwen", 9000), view("pinned", 20000, Phase.READY, mode=ALWAYS)]
    d = decide_load("qwen", views, Memory({GPU: 4000}), now=0.0)
    assert isinstance(d, Refuse)
    assert d.reason == ("model qwen does not fit: needs 9,000 MiB, 4,000 MiB free and "
                        "nothing idle to evict; always-loaded: pinned")


def test_bigger_than_the_whole_budget_is_refused_at_once() -> None:
    views = [view("huge", 30000, dev="host")]
    d = decide_load("huge", views, Memory(budget_mib=16000), now=0.0)
    assert d == Refuse("model huge needs 30,000 MiB on host, more than the whole budget: "
                       "agent.memory_budget_mib is 16,000 MiB")
    d = decide_load("huge", [view("huge", 30000)], Memory({GPU: 24000}, {GPU: 24000}), 0.0)
    assert isinstance(d, Refuse) and "GPU-a has 24,000 MiB" in d.reason


def test_budget_counts_estimates_of_loaded_instances() -> None:
    # CPU-only host: no measurement, only the budget
    views = [view("a", 600, dev="host"), view("b", 500, Phase.READY, last_use=1.0, dev="host")]
    d = decide_load("a", views, Memory(budget_mib=1000), now=2.0)
    assert isinstance(d, Load) and d.evict == ("b",)
    d = decide_load("a", views, Memory(budget_mib=1200), now=2.0)
    assert d == Load((), "needs 600 MiB, 700 MiB free")


def test_budget_caps_a_gpu_with_more_free_memory() -> None:
    views = [view("a", 6000), view("b", 5000, Phase.READY, last_use=1.0)]
    d = decide_load("a", views, Memory({GPU: 40000}, budget_mib=10000), now=2.0)
    assert isinstance(d, Load) and d.evict == ("b",)


def test_memory_of_a_loading_instance_counts_as_used() -> None:
    # b is loading and has not allocated yet: NVML shows 10,000 free, 4,000 are b's
    views = [view("a", 7000), view("b", 4000, Phase.LOADING)]
    d = decide_load("a", views, Memory({GPU: 10000}), now=0.0)
    assert isinstance(d, Refuse)  # b is not evictable while it loads, nothing idle
    assert "6,000 MiB free" in d.reason


def test_an_instance_that_is_stopping_is_waited_for() -> None:
    views = [view("a", 7000), view("b", 4000, Phase.STOPPING)]
    d = decide_load("a", views, Memory({GPU: 5000}), now=0.0, waiting_since=0.0,
                    evict_wait_s=10.0)
    assert d == Wait("waiting for b to stop (7,000 MiB needed)", ("b",))
    d = decide_load("a", [view("a", 1, Phase.STOPPING)], Memory({GPU: 5000}), 0.0, 0.0, 10.0)
    assert isinstance(d, Wait)


def test_evicts_only_instances_on_the_short_device() -> None:
    views = [InstanceView("a", OD, Phase.UNLOADED, {"GPU-a": 5000}),
             view("on-b", 8000, Phase.READY, last_use=0.0, dev="GPU-b"),
             view("on-a", 3000, Phase.READY, last_use=5.0, dev="GPU-a")]
    d = decide_load("a", views, Memory({"GPU-a": 3000, "GPU-b": 0}), now=10.0)
    assert isinstance(d, Load) and d.evict == ("on-a",)


def test_ttl_from_the_end_of_the_last_task() -> None:
    views = [view("a", 1, Phase.READY, last_use=100.0, ttl_s=600.0),
             view("busy", 1, Phase.READY, busy=True, last_use=0.0, ttl_s=1.0),
             view("forever", 1, Phase.READY, last_use=0.0, ttl_s=0.0),
             view("pinned", 1, Phase.READY, mode=ALWAYS, last_use=0.0, ttl_s=1.0),
             view("gone", 1, Phase.UNLOADED, last_use=0.0, ttl_s=1.0)]
    assert ttl_expired(views, now=699.9) == []
    (u,) = ttl_expired(views, now=700.0)
    assert (u.name, u.reason) == ("a", "idle for ttl 600 s")
    assert ttl_left(views[0], 400.0) == 300.0
    assert ttl_left(views[1], 400.0) is None and ttl_left(views[2], 400.0) is None
    assert next_ttl_deadline(views, 400.0) == 300.0
    assert next_ttl_deadline(views[1:], 400.0) is None
