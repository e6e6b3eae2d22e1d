"""The character-level language-model task: built-in corpus, transformer, training."""

import gzip

import pytest
import torch
from torch.func import grad, vmap

from metagg.config import ConfigError, config_from_dict
from metagg.data import load_dataset, partition
from metagg.data.text import CORPUS_FILE, _corpus, text_splits, unigram_entropy
from metagg.layout import ParamLayout
from metagg.models import build_model, parse_model_spec
from metagg.simulation import Simulation, build_workers
from metagg.tasks import Task


@pytest.fixture(scope="module")
def text():
    return load_dataset("text")


def lm_config(**overrides):
    d = {"model": "transformer:1:16:2", "data": {"name": "text", "seq_len": 16},
         "workers": {"num_workers": 4, "batch_size": 8}, "rounds": 10, "eval_every": 5,
         "eval_train_samples": 256, "optimizer": {"name": "adam", "lr": 0.01}}
    d.update(overrides)
    return config_from_dict(d)


def test_builtin_corpus_is_fixed_and_windows_are_shifted_by_one(text):
    assert text.tokens and text.num_classes == 84
    assert text.x_train.shape == text.y_train.shape == (3679, 32)
    assert text.x_test.shape == (408, 32) and text.x_train.dtype == torch.int64
    # targets are the inputs one character later, across window boundaries too
    assert torch.equal(text.y_train[:, :-1], text.x_train[:, 1:])
    assert torch.equal(text.y_train[:-1, -1], text.x_train[1:, 0])
    assert int(text.x_train.max()) < 84 and int(text.x_train.min()) >= 0
    # the vocabulary is the sorted characters: ids decode back to the corpus
    corpus = _corpus()
    vocab = sorted(set(corpus))
    assert "".join(vocab[i] for i in text.x_train[0].tolist()) == corpus[:32]
    assert torch.equal(load_dataset("text").x_train, text.x_train)  # deterministic


def test_seq_len_and_own_text_file(tmp_path):
    short = load_dataset("text", seq_len=8)
    assert short.input_shape == (8,) and short.name == "text@8"
    path = tmp_path / "poem.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    ds = load_dataset("text", path=path, seq_len=10)
    assert ds.name == "text:poem.txt@10" and ds.num_classes == len(set(path.read_text()))
    assert len(ds.x_train) == (int(900 * 0.9) - 1) // 10


def test_bad_text_input_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="text file not found"):
        text_splits(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        text_splits(tmp_path / "bin.txt")
    (tmp_path / "tiny.txt").write_text("abc")
    with pytest.raises(ValueError, match="too few"):
        text_splits(tmp_path / "tiny.txt")
    with pytest.raises(ValueError, match="seq_len"):
        text_splits(seq_len=0)
    with pytest.raises(ValueError, match="do not apply"):
        load_dataset("text", classes=[0, 1])
    tampered = tmp_path / "corpus.txt.gz"
    tampered.write_bytes(gzip.compress(gzip.decompress(CORPUS_FILE.read_bytes()) + b"!"))
    with pytest.raises(ValueError, match="corrupt"):
        _corpus(tampered)
    (tmp_path / "cut.gz").write_bytes(CORPUS_FILE.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        _corpus(tmp_path / "cut.gz")
    with pytest.raises(FileNotFoundError, match="reinstall"):
        _corpus(tmp_path / "nowhere.gz")


def test_transformer_shape_size_and_causality():
    vocab, t, dim = 20, 12, 16
    model = build_model("transformer:2:16:4", (t,), vocab)
    per_block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) \
        + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    expected = vocab * dim + t * dim + 2 * per_block + 2 * dim + dim * vocab + vocab
    assert ParamLayout.from_module(model).size == expected
    x = torch.randint(0, vocab, (3, t), generator=torch.Generator().manual_seed(0))
    logits = model(x)
    assert logits.shape == (3, t, vocab)
    assert model(x[:, :5]).shape == (3, 5, vocab)  # shorter sequences work
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % vocab
    after = model(changed)
    # positions before 7 cannot see token 7; position 7 and later do
    torch.testing.assert_close(after[:, :7], logits[:, :7])
    assert not torch.allclose(after[:, 7:], logits[:, 7:])


@pytest.mark.parametrize("spec", ["transformer:2:30:4", "transformer:0:16:2",
                                  "transformer:2:16", "transformer:a:16:2"])
def test_bad_transformer_specs(spec):
    with pytest.raises(ValueError, match=r"transformer|model spec"):
        parse_model_spec(spec)


def test_task_loss_is_per_token_and_vmaps_over_workers(text):
    task = Task(build_model("transformer:1:16:2", (32,), 84), num_classes=84)
    theta = task.init_params(seed=0)
    x, y = text.x_train[:6], text.y_train[:6]
    logits = task.logits(theta, x)
    manual = -logits.log_softmax(-1).gather(-1, y[..., None]).mean()
    torch.testing.assert_close(task.loss(theta, x, y), manual)
    # an untrained LM is about uniform over the vocabulary
    assert abs(float(manual) - torch.log(torch.tensor(84.0))) < 0.5
    ev = task.evaluate(theta, x, y, batch_size=4)  # chunked: same numbers
    assert ev["loss"] == pytest.approx(float(manual), rel=1e-5)
    assert ev["accuracy"] == pytest.approx(float((logits.argmax(-1) == y).float().mean()))
    # the workers' vmapped gradients equal one-at-a-time gradients
    params = theta + 0.01 * torch.randn(3, task.dim, generator=torch.Generator().manual_seed(1))
    xs, ys = text.x_train[:6].view(3, 2, 32), text.y_train[:6].view(3, 2, 32)
    batched = vmap(grad(task.loss))(params, xs, ys)
    for k in range(3):
        torch.testing.assert_close(batched[k], grad(task.loss)(params[k], xs[k], ys[k]),
                                   rtol=1e-4, atol=1e-6)


def test_sequences_have_no_label_to_skew_by(text):
    parts = partition(text.y_train, 4, "iid", seed=0)
    assert [len(p) for p in parts] == [len(text.y_train) // 4] * 4
    with pytest.raises(ValueError, match="use partition: iid"):
        partition(text.y_train, 4, "dirichlet", seed=0)
    with pytest.raises(ConfigError, match="partition"):
        lm_config(data={"name": "text", "partition": "shards"})


def test_model_and_data_must_fit(text, digits):
    with pytest.raises(ConfigError, match="language model"):
        build_workers(lm_config(model="mlp:20:relu"), dataset=text)
    with pytest.raises(ConfigError, match="token data"):
        build_workers(lm_config(data={"name": "digits"}), dataset=digits)


def test_averaged_gradients_learn_below_the_unigram_entropy(text):
    """Issue 14: the LM under mean + Adam beats the best context-free model."""
    cfg = lm_config(model="transformer:2:32:4", data={"name": "text"}, rounds=150,
                    eval_every=150, workers={"num_workers": 4, "batch_size": 16})
    summary = Simulation(cfg, dataset=text).run()
    floor = unigram_entropy(text.y_test, text.num_classes)
    assert 3.0 < floor < 3.4
    assert summary["final_test_loss"] < floor - 0.4, (summary["final_test_loss"], floor)


@pytest.mark.parametrize("aggregator", ["lopt:pretrained/fmnist8x8-mlp32-lopt-k8h4",
                                        "lagg:pretrained/fmnist8x8-mlp32-lagg-k8h4"])
def test_learned_aggregators_run_on_the_lm_in_local_sgd(aggregator):
    # K = 8 workers: the shipped LAgg-A takes the workers as its input width
    cfg = lm_config(workers={"num_workers": 8, "batch_size": 8, "mode": "local_sgd",
                             "local_steps": 2, "local_lr": 0.3},
                    aggregator={"name": aggregator}, rounds=6, eval_every=6)
    sim = Simulation(cfg)
    start = sim.task.evaluate(sim.params, sim.dataset.x_test, sim.dataset.y_test)["loss"]
    summary = sim.run()
    assert torch.isfinite(sim.params).all()
    assert summary["final_test_loss"] < start


def test_lm_run_resumes_to_the_same_numbers(text, tmp_path):
    full = Simulation(lm_config(), dataset=text)
    full.run(tmp_path / "full")
    part = Simulation(lm_config(), dataset=text)
    part.run(tmp_path / "part", stop_after=4)
    resumed = Simulation(lm_config(), dataset=text)
    resumed.run(tmp_path / "part", resume=True)
    assert torch.equal(full.params, resumed.params)
