"""The TTS task: metrics, alignment, the ESPnet attention adapter, training and synthesis."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

pytest.importorskip("espnet")
pytest.importorskip("librosa")
pytest.importorskip("soundfile")

import soundfile as sf
import torch
from espnet.nets.pytorch_backend.nets_utils import make_non_pad_mask
from espnet.nets.pytorch_backend.transformer.attention import MultiHeadedAttention
from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask

from attention_zoo import AttentionConfigError, Pattern
from runners.execute import execute
from tasks.base import AttentionChoice, RunContext
from tasks.tts import metrics
from tasks.tts.adapter import EspnetAttentionAdapter, key_padding_mask
from tasks.tts.align import (
    align,
    forward_sum_loss,
    monotonic_alignment_search,
    read_durations,
    train_aligner,
)
from tasks.tts.data import (
    FEATURES,
    SAMPLE_ROOT,
    CharacterVocabulary,
    Clip,
    load_audio,
    load_corpus,
    pad,
    read_ljspeech,
    split_clips,
)
from tasks.tts.model import (
    FASTSPEECH2_ROLES,
    TRANSFORMER_ROLES,
    ModelSize,
    build_fastspeech2,
    build_transformer,
)
from tasks.tts.task import FastSpeech2Task, TransformerTTSTask, TTSConfig

pytestmark = pytest.mark.task

TINY = ModelSize(adim=16, aheads=2, elayers=2, eunits=32, dlayers=3, dunits=32,
                 postnet_layers=1, postnet_chans=16, dropout=0.0)
VOCABULARY = len(CharacterVocabulary())


# --- metrics -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_audio(SAMPLE_ROOT / "wavs" / "LJ001-0008.flac")  # 1.8 s


@pytest.mark.parametrize("metric", [metrics.mcd, metrics.msd, metrics.cab_mcd, metrics.cab_msd])
def test_distortion_is_zero_on_itself_and_grows_with_noise(speech, metric):
    assert metric(speech, speech) == pytest.approx(0.0, abs=1e-9)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(speech.shape).astype(np.float32)
    scores = [metric(speech + level * noise, speech) for level in (1e-3, 1e-2, 1e-1)]
    assert 0 < scores[0] < scores[1] < scores[2], scores


def test_mel_cepstrum_without_warping_is_the_real_cepstrum(speech):
    # alpha = 0: c_0 and 2 x c_m of the real cepstrum of each windowed frame (numpy's inverse FFT).
    cepstra = metrics.mel_cepstrum(speech, order=24, alpha=0.0)
    framed = metrics.frames(speech, 1024, 256)
    log_amplitude = 0.5 * np.log(np.maximum(np.abs(np.fft.rfft(framed, axis=1)) ** 2, 1e-10))
    real = np.fft.irfft(log_amplitude, n=1024, axis=1)[:, :25]
    real[:, 1:] *= 2.0
    assert cepstra.shape == (1 + (len(speech) - 1024) // 256, 25)
    np.testing.assert_allclose(cepstra, real, atol=1e-9)


def test_warping_maps_the_even_warped_grid_back_through_the_all_pass():
    # The all-pass's phase, w~ = w + 2 atan(a sin w / (1 - a cos w)), of each returned frequency
    # gives back the evenly spaced warped grid; a > 0 stretches the low frequencies.
    alpha = metrics.MCEP_ALPHA
    linear = metrics.warped_frequencies(65, alpha)
    warped = linear + 2 * np.arctan(alpha * np.sin(linear) / (1 - alpha * np.cos(linear)))
    np.testing.assert_allclose(warped, np.linspace(0, math.pi, 65), atol=1e-12)
    assert linear[1] < math.pi / 64


def test_an_early_stop_shows_in_the_length_ratio_not_in_the_mcd(speech):
    # The first quarter of the clip against the whole: CAB's per-synthesized-frame MCD grows about
    # fourfold, the MCD along the DTW path does not.
    early = speech[: len(speech) // 4]
    noise = np.random.default_rng(0).standard_normal(speech.shape).astype(np.float32) * 1e-2
    full_cab, early_cab = metrics.cab_mcd(speech + noise, speech), metrics.cab_mcd(early, speech)
    assert early_cab > 2.5 * full_cab
    assert metrics.mcd(early, speech) < 2.0 * metrics.mcd(speech + noise, speech)
    # An output of 4 mel frames (768 samples, under one 1024-sample analysis frame) still scores.
    short = speech[:768]
    assert math.isfinite(metrics.mcd(short, speech)) and math.isfinite(metrics.msd(short, speech))


def _brute_force_dtw(x: np.ndarray, y: np.ndarray) -> float:
    """Minimum over every monotonic path from (0, 0) to the last pair, enumerated explicitly."""
    distance = np.linalg.norm(x[:, None] - y[None], axis=-1)
    best = math.inf
    moves = [(1, 0), (0, 1), (1, 1)]

    def walk(i: int, j: int, cost: float) -> None:
        nonlocal best
        if (i, j) == (len(x) - 1, len(y) - 1):
            best = min(best, cost)
            return
        for di, dj in moves:
            if i + di < len(x) and j + dj < len(y):
                walk(i + di, j + dj, cost + distance[i + di, j + dj])

    walk(0, 0, distance[0, 0])
    return best


@pytest.mark.parametrize("lengths", [(1, 4), (4, 3), (5, 5), (6, 4)])
def test_dtw_matches_brute_force(lengths):
    rng = np.random.default_rng(sum(lengths))
    x, y = rng.standard_normal((lengths[0], 3)), rng.standard_normal((lengths[1], 3))
    total, path = metrics.dtw(x, y)
    assert total == pytest.approx(_brute_force_dtw(x, y), rel=1e-12)
    assert tuple(path[0]) == (0, 0) and tuple(path[-1]) == (len(x) - 1, len(y) - 1)
    steps = np.diff(path, axis=0)
    assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(axis=1) > 0).all()
    assert np.linalg.norm(x[path[:, 0]] - y[path[:, 1]], axis=1).sum() == pytest.approx(total)


# --- alignment -------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,tokens", [(5, 3), (7, 4), (6, 6)])
def test_monotonic_alignment_search_finds_the_best_path(frames, tokens):
    rng = np.random.default_rng(frames * tokens)
    log_probability = rng.standard_normal((frames, tokens))
    best = -math.inf
    for cuts in itertools.combinations(range(1, frames), tokens - 1):
        durations = np.diff([0, *cuts, frames])
        token_of_frame = np.repeat(np.arange(tokens), durations)
        best = max(best, log_probability[np.arange(frames), token_of_frame].sum())
    durations = monotonic_alignment_search(log_probability)
    assert durations.sum() == frames and (durations >= 1).all()
    found = log_probability[np.arange(frames), np.repeat(np.arange(tokens), durations)].sum()
    assert found == pytest.approx(best)


@pytest.mark.slow
def test_aligner_learns_and_aligns_every_frame(corpus):
    def loss_after(steps: int) -> float:
        model = train_aligner(corpus.train, VOCABULARY, steps=steps, seed=0, batch_size=2, lr=3e-3)
        tokens, token_lengths = pad([u.tokens for u in corpus.train])
        mels, frame_lengths = pad([model.normaliser(u.mel) for u in corpus.train])
        with torch.no_grad():
            return float(forward_sum_loss(model(tokens, token_lengths, mels, frame_lengths),
                                          token_lengths, frame_lengths))

    assert loss_after(15) < 0.8 * loss_after(0)
    model = train_aligner(corpus.train, VOCABULARY, steps=1, seed=0, batch_size=2)
    for u in corpus.train:
        d = align(model, [u])[u.clip_id]
        assert d.shape[0] == len(u.tokens) + 1 and int(d.sum()) == u.frames and d[-1] == 0
        assert (d[:-1] >= 1).all()


def test_shipped_durations_fit_every_sample_clip():
    durations = read_durations(SAMPLE_ROOT / "durations.txt")
    vocabulary = CharacterVocabulary()
    clips = read_ljspeech(SAMPLE_ROOT)
    assert len(clips) == 32 and set(durations) == {c.clip_id for c in clips}
    for clip in clips:
        d = durations[clip.clip_id]
        assert d.shape[0] == len(vocabulary.encode(clip.text)) + 1 and d[-1] == 0
        assert int(d.sum()) == FEATURES.frames(sf.info(clip.audio).frames)
        assert (d[:-1] >= 1).all()


def test_splits():
    sample = split_clips(read_ljspeech(SAMPLE_ROOT))
    assert [len(sample[s]) for s in ("train", "dev", "test")] == [24, 4, 4]
    assert [c.clip_id for c in sample["test"]] == ["LJ001-0008", "LJ001-0016", "LJ001-0024", "LJ001-0032"]
    full = [Clip(f"LJ{chapter:03d}-0001", "a", SAMPLE_ROOT) for chapter in range(1, 6)]
    cab = split_clips(full)
    assert [c.clip_id[:5] for c in cab["test"]] == ["LJ001", "LJ002"]
    assert [c.clip_id[:5] for c in cab["dev"]] == ["LJ003"]
    assert [c.clip_id[:5] for c in cab["train"]] == ["LJ004", "LJ005"]


# --- the attention adapter ------------------------------------------------------------------------

def _everyone(roles, name="softmax"):
    return {role: AttentionChoice(name) for role in roles}


def test_every_espnet_attention_module_is_replaced():
    from espnet2.tts.fastspeech2 import FastSpeech2
    from espnet2.tts.transformer import Transformer

    plain_fs2 = FastSpeech2(idim=VOCABULARY, odim=80, adim=16, aheads=2, elayers=2, dlayers=3,
                            eunits=32, dunits=32)
    plain_tr = Transformer(idim=VOCABULARY, odim=80, adim=16, aheads=2, elayers=2, dlayers=3,
                           eunits=32, dunits=32)
    count = {name: sum(isinstance(m, MultiHeadedAttention) for m in model.modules())
             for name, model in (("fs2", plain_fs2), ("tr", plain_tr))}
    assert count == {"fs2": 2 + 3, "tr": 2 + 3 + 3}  # encoder self, decoder self (+ cross)

    for build, roles, expected in (
        (build_fastspeech2, FASTSPEECH2_ROLES, {"encoder_self": 2, "decoder_self": 3}),
        (build_transformer, TRANSFORMER_ROLES, {"encoder_self": 2, "decoder_self": 3, "cross": 3}),
    ):
        model, replaced = build(VOCABULARY, 80, TINY, _everyone(roles, "lavo"))
        assert {role: len(paths) for role, paths in replaced.items()} == expected
        assert not any(isinstance(m, MultiHeadedAttention) for m in model.modules())
        adapters = [m for m in model.modules() if isinstance(m, EspnetAttentionAdapter)]
        assert len(adapters) == sum(expected.values())
        assert all(a.attention.name == "lavo" for a in adapters)
        for role, paths in replaced.items():
            assert {model.get_submodule(p).pattern for p in paths} == {roles[role]}


def _pair(pattern: Pattern, seed: int) -> tuple[MultiHeadedAttention, EspnetAttentionAdapter]:
    torch.manual_seed(seed)
    espnet = MultiHeadedAttention(n_head=4, n_feat=32, dropout_rate=0.0).double().eval()
    adapter = EspnetAttentionAdapter.replacing(espnet, AttentionChoice("softmax"), pattern).double().eval()
    return espnet, adapter


def test_adapter_reproduces_espnet_softmax_in_every_pattern():
    query_lengths, key_lengths = torch.tensor([9, 6, 9]), torch.tensor([7, 7, 4])
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    memory = torch.randn(3, 7, 32, dtype=torch.float64)
    valid_queries = make_non_pad_mask(query_lengths)  # [B, 9]
    self_padding = make_non_pad_mask(query_lengths).unsqueeze(-2)  # [B, 1, 9]
    causal = self_padding & subsequent_mask(9).unsqueeze(0)  # [B, 9, 9], ESPnet's target mask
    cross_padding = make_non_pad_mask(key_lengths).unsqueeze(-2)  # [B, 1, 7]
    cases = [
        # pattern, query, key, the mask ESPnet's module gets, the mask the adapter gets
        (Pattern.NONCAUSAL_SELF, x, x, self_padding, self_padding),
        (Pattern.CAUSAL_SELF, x, x, causal, causal),
        (Pattern.NONCAUSAL_CROSS, x, memory, cross_padding, cross_padding),
        (Pattern.CAUSAL_CROSS, x, memory, cross_padding, cross_padding),  # sees the whole source
        (Pattern.NONCAUSAL_SELF, x, x, None, None),
    ]
    for seed, (pattern, query, key, espnet_mask, adapter_mask) in enumerate(cases):
        espnet, adapter = _pair(pattern, seed)
        expected = espnet(query, key, key, espnet_mask)
        got = adapter(query, key, key, adapter_mask)
        # Outputs at padded queries are meaningless in the zoo's contract; compare the others.
        padded_queries = espnet_mask is not None and not pattern.cross
        rows = valid_queries if padded_queries else torch.ones(3, 9, dtype=torch.bool)
        torch.testing.assert_close(got[rows], expected[rows], rtol=1e-10, atol=1e-10,
                                   msg=f"{pattern.value}: adapter differs from ESPnet")


def test_adapter_refuses_what_it_cannot_express():
    _, adapter = _pair(Pattern.NONCAUSAL_SELF, 0)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    scrambled = torch.rand(2, 5, 5) > 0.5
    with pytest.raises(ValueError, match="not key padding combined with non-causal"):
        adapter(x, x, x, scrambled)
    with pytest.raises(ValueError, match="cached one-step decoding is not supported"):
        adapter(x[:, -1:], x, x, None)
    with pytest.raises(ValueError, match=r"must be \[B, 1, 5\] or \[B, 5, 5\]"):
        key_padding_mask(torch.ones(2, 3, 5, dtype=torch.bool), 5, 5, causal=False)
    causal_without_triangle = torch.ones(2, 5, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="not key padding combined with causal"):
        key_padding_mask(causal_without_triangle, 5, 5, causal=True)


# --- training and synthesis ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus():
    task = FastSpeech2Task()
    config = TTSConfig(train_clips=2)
    loaded = load_corpus(config)
    task.targets(config, loaded, RunContext(seed=0, device="cpu", workdir=None))
    return loaded


@pytest.mark.parametrize("mechanism", ["softmax", "lavo"])
@pytest.mark.parametrize("task_class", [FastSpeech2Task, TransformerTTSTask])
@pytest.mark.slow
def test_both_models_train(task_class, mechanism, corpus):
    torch.manual_seed(0)
    task = task_class()
    config = TTSConfig(d_model=16, eunits=32, dunits=32, postnet_chans=16, dropout=0.0)
    model, _ = task.build_model(VOCABULARY, 80, config.size, _everyone(task.roles, mechanism))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = task.loss(model, corpus.train, corpus, "cpu")
        optimiser.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("task_class", [FastSpeech2Task, TransformerTTSTask])
@pytest.mark.slow
def test_run_writes_valid_audio_and_a_figure(task_class, tmp_path):
    config = task_class.make_config({"train_clips": 1, "steps": 2, "eval_clips": 1, "d_model": 16,
                                     "eunits": 32, "dunits": 32, "griffin_lim_iterations": 2,
                                     "maxlenratio": 2.0})
    result = execute(task_class, config, AttentionChoice("lavo"), seed=0, device="cpu", workdir=tmp_path)
    assert set(result.metrics) == {"mcd", "msd", "length_ratio", "cab_mcd", "cab_msd"}
    assert all(math.isfinite(v) and v > 0 for v in result.metrics.values())
    frames = result.extra["artifacts"]["frames"]["LJ001-0008"]
    assert result.metrics["length_ratio"] == pytest.approx(frames["synthesized"] / frames["reference"])
    assert result.extra["test_clips"] == ["LJ001-0008"]
    original = sf.info(SAMPLE_ROOT / "wavs" / "LJ001-0008.flac").frames
    characters = len(CharacterVocabulary().encode("has never been surpassed."))
    for path in result.extra["artifacts"]["audio"]:
        info = sf.info(path)
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 22050, 1)
        audio, _ = sf.read(path)
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0
        if path.endswith("_reference.wav"):  # Griffin-Lim of the ground truth: the clip's length
            assert original - FEATURES.hop_length <= info.frames <= original
        else:  # whole frames: Transformer-TTS stops by maxlenratio per character at the latest
            frames = info.frames // FEATURES.hop_length + 1
            assert info.frames % FEATURES.hop_length == 0
            most = 2.0 if task_class is TransformerTTSTask else 50.0
            assert 2 <= frames <= most * (characters + 1)
    assert (tmp_path / "mel_LJ001-0008.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_settings_are_refused():
    with pytest.raises(AttentionConfigError, match="unknown setting 'model'"):
        TransformerTTSTask.make_config({"model": "fastspeech2"})
