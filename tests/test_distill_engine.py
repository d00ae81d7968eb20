"""The engine on tiny in-memory data: modes, hooks, checkpoints, resume, non-finite losses."""
import pytest
import torch
from torch.utils.data import Dataset

from data import build_loader

from distill import DistillationLoss, Engine, EngineConfig, FrozenTeacher, NonFiniteLossError
from models import create_model


class Blobs(Dataset):
    """Two classes of clouds: a small and a large blob (learnable in a few steps).

    Like `data.PointCloudDataset`, items fetched as `(index, seed)` augment with their own
    generator, so `data.build_loader` pins augmentation down per sample.
    """

    accepts_seeded_keys = True

    def __init__(self, n=16, points=64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.label = torch.arange(n) % 2
        self.xyz = torch.randn(n, points, 3, generator=gen) * (0.2 + 0.6 * self.label[:, None, None])

    def __len__(self):
        return len(self.label)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        xyz = self.xyz[index] * (1 + 0.2 * torch.rand((), generator=gen))  # augmentation: a random scale
        return {"xyz": xyz, "feats": xyz.t().contiguous(), "label": self.label[index]}


def loader(shuffle=True):
    return build_loader(Blobs(), batch_size=4, shuffle=shuffle, seed=0)


def tiny():
    torch.manual_seed(0)
    return create_model("pointnext-s", num_classes=2, width=8)


def make_engine(model, tmp_path=None, epochs=2, teacher=None, alpha=0.0, hooks=(), nonfinite="stop", lr=1e-2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    return Engine(model, DistillationLoss(alpha, 2.0, 0.0), optimizer, None, loader(),
                  EngineConfig(epochs=epochs, seed=0, checkpoint_dir=tmp_path, nonfinite=nonfinite, log_every=1),
                  num_classes=2, val_loader=loader(shuffle=False), teacher=teacher, hooks=hooks)


def test_fp32_mode_trains_and_reports_validation_metrics():
    engine = make_engine(tiny(), epochs=2)
    history = engine.fit()
    assert [h["epoch"] for h in history] == [0, 1]
    assert {"val/oa_fp32", "val/macc_fp32", "train/loss_epoch", "train/kd_loss_epoch"} <= history[-1].keys()
    assert history[-1]["train/kd_loss_epoch"] == 0.0
    assert engine.step == 2 * 4


def test_kd_mode_uses_the_teacher_and_never_updates_it():
    teacher = FrozenTeacher(tiny())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    engine = make_engine(tiny(), epochs=1, teacher=teacher, alpha=0.5)
    history = engine.fit()
    assert history[0]["train/kd_loss_epoch"] > 0.0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not teacher.model.training


def test_kd_at_alpha_zero_trains_exactly_as_without_a_teacher():
    """α = 0 is plain training: the teacher's forward (and the neighbour search it shares with the
    student) changes no weight bit, so the kd table's α = 0 column is the QAT row of the bits table."""
    def trained(teacher, alpha):
        student = tiny()
        make_engine(student, epochs=1, teacher=teacher, alpha=alpha).fit()
        return student.state_dict()

    alone = trained(None, 0.0)
    with_teacher = trained(FrozenTeacher(create_model("pointnext-s", num_classes=2, width=8)), 0.0)
    assert all(torch.equal(alone[k], with_teacher[k]) for k in alone)
    distilled = trained(FrozenTeacher(create_model("pointnext-s", num_classes=2, width=8)), 0.25)  # negative control
    assert not all(torch.equal(alone[k], distilled[k]) for k in alone)


def test_hooks_run_at_every_epoch_start_and_their_state_is_logged():
    class Recorder:
        def __init__(self):
            self.epochs = []

        def on_epoch_start(self, model, epoch):
            self.epochs.append(epoch)
            return {"hook/epoch": float(epoch)}

    hook = Recorder()
    history = make_engine(tiny(), epochs=3, hooks=(hook,)).fit()
    assert hook.epochs == [0, 1, 2] and [h["hook/epoch"] for h in history] == [0.0, 1.0, 2.0]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = make_engine(tiny(), tmp_path / "full", epochs=3)
    full.fit()
    part = make_engine(tiny(), tmp_path / "part", epochs=1)
    part.fit()  # "killed" after epoch 0; its last.pt holds epoch 1 as the next to run
    resumed = make_engine(tiny(), tmp_path / "part", epochs=3)
    assert resumed.resume() and resumed.epoch == 1
    resumed.fit()
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert full.history == resumed.history


def test_checkpoint_is_written_atomically_each_epoch(tmp_path):
    make_engine(tiny(), tmp_path, epochs=1).fit()
    assert (tmp_path / "last.pt").is_file()
    assert not list(tmp_path.glob(".*tmp"))


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path):
    engine = make_engine(tiny(), tmp_path, epochs=1)
    engine.fit()
    saved = (tmp_path / "last.pt").read_bytes()
    engine.config.epochs = 2
    engine.loss_fn = lambda *a: {"loss": torch.tensor(float("nan"), requires_grad=True),
                                 "task_loss": torch.tensor(0.0), "kd_loss": torch.tensor(0.0)}
    engine.loss_fn.alpha = 0.0
    with pytest.raises(NonFiniteLossError, match="epoch 1 step 0"):
        engine.fit()
    assert (tmp_path / "last.pt").read_bytes() == saved


class EveryOtherNaN(DistillationLoss):
    """The task + KD loss, made NaN on every second call (calls 1, 3, ...)."""

    calls = 0

    def forward(self, *args):
        out = super().forward(*args)
        self.calls += 1
        if self.calls % 2 == 0:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nonfinite_skip_counts_skipped_batches_and_trains_on_the_rest():
    engine = make_engine(tiny(), epochs=1, nonfinite="skip")
    engine.loss_fn = EveryOtherNaN(0.0, 2.0, 0.0)
    history = engine.fit()
    assert history[0]["train/skipped_steps"] == 2.0
    assert engine.step == 2  # 4 batches, 2 skipped: no optimizer update for those
    assert all(torch.isfinite(p).all() for p in engine.student.parameters())


def test_nonfinite_skip_still_stops_when_every_batch_of_an_epoch_is_skipped(tmp_path):
    engine = make_engine(tiny(), tmp_path, epochs=1, nonfinite="skip")

    class NaNLoss(DistillationLoss):
        def forward(self, *args):
            out = super().forward(*args)
            out["loss"] = out["loss"] * float("nan")
            return out

    engine.loss_fn = NaNLoss(0.0, 2.0, 0.0)
    with pytest.raises(NonFiniteLossError, match="every one of the 4 batches of epoch 0"):
        engine.fit()
    assert not (tmp_path / "last.pt").exists()


def test_resume_ignores_and_removes_a_temporary_left_by_a_killed_writer(tmp_path):
    engine = make_engine(tiny(), tmp_path, epochs=1)
    engine.fit()
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")  # what SIGKILL during atomic_torch_save leaves
    resumed = make_engine(tiny(), tmp_path, epochs=2)
    assert resumed.resume() and resumed.epoch == 1
    assert not stale.exists()


@pytest.mark.slow  # two FX-prepared students trained for an epoch: ~30 s on a busy 2-core machine
def test_step_context_wraps_the_forwards_and_shared_neighbourhoods_change_no_bit_of_a_kd_qat_step():
    """Teacher and fake-quant student search the same clouds' neighbourhoods once per step, with
    the loss and every gradient bit-identical to searching twice."""
    import qat
    from models.neighbors import NeighborhoodMemo, shared_neighborhoods

    memos: list[NeighborhoodMemo] = []

    def recording():
        memo = NeighborhoodMemo()
        memos.append(memo)
        return shared_neighborhoods(memo)

    runs = []
    for context in (None, recording):
        student = qat.prepare_qat(tiny().train(), qat.QConfigSpec(), (torch.randn(2, 64, 3),))
        engine = make_engine(student, epochs=1, teacher=FrozenTeacher(tiny()), alpha=0.5)
        engine.step_context, engine.val_loader = context or engine.step_context, None
        grads = []
        engine.optimizer.step = lambda *a, _s=engine.optimizer.step, **k: (
            grads.append([p.grad.clone() for p in student.parameters() if p.grad is not None]), _s(*a, **k))[1]
        history = engine.fit()
        runs.append((history[0]["train/loss_epoch"], grads, [p.detach().clone() for p in student.parameters()]))
    (loss_a, grads_a, params_a), (loss_b, grads_b, params_b) = runs
    assert loss_a == loss_b and len(grads_a) == len(grads_b) == 4
    assert all(torch.equal(a, b) for step_a, step_b in zip(grads_a, grads_b) for a, b in zip(step_a, step_b))
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert len(memos) == 4 and all(m.misses == 8 and m.hits == 8 for m in memos)  # the student reused all


def test_frozen_teacher_folds_bn_and_keeps_the_logits_within_float_rounding():
    torch.manual_seed(0)
    model = tiny()
    model.train()
    with torch.no_grad():  # BN statistics of real activations, so folding changes every conv's weights
        for seed in range(3):
            model(torch.rand(8, 64, 3, generator=torch.Generator().manual_seed(seed)))
    xyz = torch.rand(4, 64, 3, generator=torch.Generator().manual_seed(9))
    unfolded, folded = FrozenTeacher(model, fold_bn=False), FrozenTeacher(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in unfolded.modules())  # control
    expected = unfolded(xyz)
    # float rounding only: measured 1e-7 of the largest logit; one BN's variance 1 % off gives 1.3e-5
    assert (folded(xyz) - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert not any(p.requires_grad for p in folded.parameters())
