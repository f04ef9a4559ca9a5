"""trainer.compile=true with trainer.sync_bn=true is refused before anything runs: torch.compile is
reported to fail on SyncBatchNorm under DDP (pytorch/pytorch#107372, open)."""
import pytest

from emca.engine.trainer import RunAborted, train

from conftest import SYNTHETIC_RUN


def test_compile_with_sync_bn_is_refused_in_one_line(compose_train, tmp_path):
    with pytest.raises(RunAborted) as error:
        train(compose_train(*SYNTHETIC_RUN, "trainer.compile=true", "trainer.sync_bn=true"), str(tmp_path))
    assert str(error.value) == (
        "trainer.compile=true does not work with trainer.sync_bn=true (torch.compile fails on SyncBatchNorm "
        "under DDP, pytorch/pytorch#107372); set one of them to false")
    assert not (tmp_path / "checkpoints").exists()
