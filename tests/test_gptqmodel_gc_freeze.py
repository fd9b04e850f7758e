"""The ``gc_freeze`` lean part (integrations.gptqmodel.gc_freeze): what was alive at the block's start is left
out of full garbage collections until its end, and handed back on any exit (objects frozen before it too, counted);
stock, with a reason, when collection is off or inside another block; the quantized model's saves run frozen too."""

from __future__ import annotations

import gc
import weakref

import pytest

from defuser_quant.integrations.gptqmodel.gc_freeze import RunFreezeStats, freeze_saves_of, frozen_heap, frozen_save


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _nothing_frozen():
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    yield
    gc.unfreeze()
    gc.enable()


def test_objects_alive_at_the_start_are_skipped_by_collections_until_the_end():
    node = _Node()
    alive = weakref.ref(node)
    with frozen_heap(count=True) as stats:
        assert stats.froze and stats.frozen > 0 and gc.get_freeze_count() > 0 and stats.stock is None
        del node
        gc.collect()  # a full collection: the frozen cycle is not looked at
        assert alive() is not None
        fresh = _Node()  # allocated during the run: collected as before
        fresh_alive = weakref.ref(fresh)
        del fresh
        gc.collect()
        assert fresh_alive() is None
    assert gc.get_freeze_count() == 0  # handed back
    gc.collect()
    assert alive() is None
    assert stats.full_collections >= 2 and stats.full_seconds > 0.0


def test_everything_is_handed_back_on_an_exception_or_ctrl_c():
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        callbacks = list(gc.callbacks)
        with pytest.raises(type(error)):
            with frozen_heap():
                assert gc.get_freeze_count() > 0
                raise error
        assert gc.get_freeze_count() == 0 and gc.callbacks == callbacks


def test_collection_turned_off_is_left_as_it_is():
    gc.disable()
    with frozen_heap() as stats:
        assert gc.get_freeze_count() == 0
    assert stats.stock == "automatic garbage collection is off" and stats.frozen is None and not stats.froze
    assert not gc.isenabled()


def test_objects_frozen_before_the_block_are_counted_and_handed_back_at_its_end(caplog):
    node = _Node()  # frozen by the caller (or the interpreter's start), then turned into garbage
    alive = weakref.ref(node)
    gc.freeze()
    # Frozen objects freed by reference counting leave the count, so it can only drop before the block starts.
    before = gc.get_freeze_count()
    del node
    with caplog.at_level("INFO", logger="defuser_quant.checkpoint.frozen_heap"):
        with frozen_heap(count=True) as stats:
            assert stats.stock is None and 0 < stats.frozen_before <= before and stats.frozen >= stats.frozen_before
            gc.collect()
            assert alive() is not None  # still frozen inside the block
    assert gc.get_freeze_count() == 0  # handed back with the rest
    gc.collect()
    assert alive() is None
    assert stats.as_dict()["frozen_before"] == stats.frozen_before
    assert any(f"{stats.frozen_before} objects were frozen before the block" in r.getMessage() for r in caplog.records)


def test_a_block_inside_another_leaves_the_objects_to_the_outer_one():
    node = _Node()
    alive = weakref.ref(node)
    with frozen_heap() as outer:
        with frozen_heap(count=True) as inner:
            assert inner.stock == "inside another frozen block, which hands the objects back at its end"
            assert inner.frozen is None and not inner.froze
        assert outer.froze and outer.frozen is None  # not counted unless asked
        assert gc.get_freeze_count() > 0  # the inner end handed nothing back
        del node
        gc.collect()
        assert alive() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None
    with frozen_heap() as again:  # the count went back down: a later block freezes
        assert again.stock is None and again.froze


class _Saver:
    """Stands in for ``BaseQModel``: its ``save`` records the frozen count it ran under."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def save(self, path: str, fail: BaseException | None = None) -> str:
        self.seen.append(gc.get_freeze_count())
        if fail is not None:
            raise fail
        return path


def test_a_registered_models_saves_run_frozen_and_others_as_they_were():
    save = frozen_save(_Saver.save)
    registered, other = _Saver(), _Saver()
    stats = RunFreezeStats()
    freeze_saves_of(registered, stats)
    assert save(registered, "a") == "a" and save(other, "b") == "b"
    assert registered.seen[0] > 0 and other.seen == [0]
    assert stats.saves == 1 and stats.save is not None and stats.save.froze and stats.save.stock is None
    assert stats.as_dict()["save"]["froze"] and stats.as_dict()["saves"] == 1
    assert gc.get_freeze_count() == 0
    for kind in (OSError, KeyboardInterrupt):
        with pytest.raises(kind):
            save(registered, "c", fail=kind("stopped"))
        assert gc.get_freeze_count() == 0
    assert stats.saves == 3
    held = weakref.ref(registered)
    del registered
    gc.collect()
    assert held() is None  # the registry holds models weakly


# ----- inside GPTQModel's run (tiny qwen3_moe, CPU) ------------------------------------------------
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_overhead import _load  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_frozen_run_gives_the_same_checkpoint_and_hands_everything_back(plugin, tiny, tmp_path):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS

    stats, frozen = _run(plugin, tiny, tmp_path, "frozen", parts=DEFAULT_PARTS | {"gc_freeze"})
    assert gc.get_freeze_count() == 0
    assert stats.gc_freeze is not None and stats.gc_freeze.froze and stats.gc_freeze.stock is None
    assert stats.gc_freeze.saves == 1 and stats.gc_freeze.save.froze  # the save ran frozen
    assert "gc_freeze" in DEFAULT_PARTS
    stock_stats, stock = _run(plugin, tiny, tmp_path, "stock", parts=False)
    assert stock_stats is None  # no lean bookkeeping: nothing frozen, the save as GPTQModel runs it
    assert _same(frozen, stock) and any(k.endswith("experts.0.gate_proj.qweight") for k in frozen)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ctrl_c_inside_a_frozen_run_hands_everything_back(plugin, tiny, tmp_path, monkeypatch):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS

    model = _load(tiny["src"], True, tmp_path / "offload")
    seen = []

    def interrupted(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plugin.quantize_with_defuser(model, tiny["calibration"][:4], batch_size=4,
                                     lean_bookkeeping=DEFAULT_PARTS | {"gc_freeze"})
    assert seen and seen[0] > 0 and gc.get_freeze_count() == 0
