"""Text-to-speech on LJSpeech with ESPnet2's FastSpeech 2 and Transformer-TTS (CAB's TTS task).

Two tasks, because the two backbones have different attention roles:

- ``tts_fastspeech2``: encoder and decoder self attention, both non-causal;
- ``tts_transformer``: encoder self (non-causal), decoder self (causal), and the decoder's cross
  attention to the characters (causal cross, CAB's pattern for this backbone).

Training is this module's own loop (ESPnet's recipe machinery needs Kaldi-style data folders and
torchaudio); evaluation synthesizes test clips, vocodes them with Griffin-Lim and scores them
against the Griffin-Lim resynthesis of the ground truth (:mod:`tasks.tts.metrics`). ESPnet, librosa
and soundfile are imported by the stages, not here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from attention_zoo import AttentionConfigError, Pattern
from tasks.base import AttentionChoice, Metric, RunContext, Task, split_heads
from tasks.registry import register_task

FASTSPEECH2_ROLES = {"encoder_self": Pattern.NONCAUSAL_SELF, "decoder_self": Pattern.NONCAUSAL_SELF}
# CAB's Transformer-TTS pattern: the decoder's cross attention is causal cross attention (every
# frame sees every character; frame t's output does not depend on later frames).
TRANSFORMER_ROLES = {"encoder_self": Pattern.NONCAUSAL_SELF, "decoder_self": Pattern.CAUSAL_SELF,
                     "cross": Pattern.CAUSAL_CROSS}



@dataclass(frozen=True)
class TTSConfig:
    """Settings of both TTS tasks; the defaults are the CPU smoke run on the shipped sample."""

    data: str = field(default="", metadata={
        "help": "LJSpeech-1.1 folder (CAB's split); empty: the shipped 32-clip sample"})
    train_clips: int = field(default=4, metadata={"min": 0, "help": "the N shortest training clips (0: all)"})
    eval_clips: int = field(default=1, metadata={"min": 0, "help": "test clips scored (0: all)"})
    steps: int = field(default=15, metadata={"min": 1})
    batch_size: int = field(default=4, metadata={"min": 1})
    lr: float = field(default=2e-3, metadata={"min": 0.0, "help": "peak learning rate (Adam)"})
    warmup_steps: int = field(default=5, metadata={"min": 0})
    clip_norm: float = field(default=1.0, metadata={"min": 0.0, "help": "largest gradient norm"})
    d_model: int = field(default=64, metadata={"min": 1, "help": "model width (ESPnet's adim)"})
    heads: int = field(default=2, metadata={"min": 1, "help": "attention heads (ESPnet's aheads)"})
    elayers: int = field(default=1, metadata={"min": 1})
    eunits: int = field(default=128, metadata={"min": 1})
    dlayers: int = field(default=1, metadata={"min": 1})
    dunits: int = field(default=128, metadata={"min": 1})
    postnet_layers: int = field(default=2, metadata={"min": 0})
    postnet_chans: int = field(default=64, metadata={"min": 1})
    dropout: float = field(default=0.1, metadata={"min": 0.0})
    griffin_lim_iterations: int = field(default=32, metadata={"min": 1})
    maxlenratio: float = field(default=10.0, metadata={
        "min": 0.0, "help": "Transformer-TTS: at most this many frames per character"})
    aligner_steps: int = field(default=400, metadata={
        "min": 1, "help": "FastSpeech 2: aligner training steps when DATA/durations.txt is missing"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: the runner's)", "min": 0})

    @property
    def size(self) -> Any:
        """The :class:`tasks.tts.model.ModelSize` of these settings."""
        from tasks.tts.model import ModelSize

        return ModelSize(adim=self.d_model, aheads=self.heads, elayers=self.elayers, eunits=self.eunits,
                         dlayers=self.dlayers, dunits=self.dunits, postnet_layers=self.postnet_layers,
                         postnet_chans=self.postnet_chans, dropout=self.dropout)


class _TTSTask(Task):
    """What both TTS backbones share: data, training loop, synthesis and scoring."""

    metrics = (
        Metric("mcd", higher_is_better=False,
               description="mel cepstral distortion (dB) along the DTW path, as ESPnet evaluates"),
        Metric("msd", higher_is_better=False,
               description="mean distance of the 80-band log-mel frames along the DTW path"),
        Metric("length_ratio", higher_is_better=False, kind="diagnostic",
               description="synthesized over reference frames (1 is right; below 1 an early stop)"),
    )
    Config = TTSConfig
    requires = ("espnet", "espnet2", "librosa", "soundfile", "scipy", "typeguard")
    datasets = {"ljspeech": "tasks.tts.data:fetch_ljspeech"}
    data_tools = {"ljspeech_durations": "tasks.tts.align:main"}
    model_name: ClassVar[str]

    @classmethod
    def check_settings(cls, config: TTSConfig) -> None:
        """The clips asked for exist, when the LJSpeech folder is at hand."""
        from tasks.tts.data import SAMPLE_ROOT, checked_splits

        data = Path(config.data).expanduser() if config.data else SAMPLE_ROOT
        if (data / "metadata.csv").is_file():
            try:
                checked_splits(data, config)
            except (FileNotFoundError, ValueError) as error:
                raise AttentionConfigError(f"task {cls.name}: {error}") from None

    @classmethod
    def attention_shapes(cls, config: TTSConfig) -> dict[str, tuple[int, int]]:
        shape = split_heads(config.d_model, config.heads, f"task {cls.name}: d_model / heads")
        return dict.fromkeys(cls.roles, shape)

    def prepare(self, config: TTSConfig, run: RunContext) -> Any:
        """The corpus's features, and the model's own targets (:meth:`targets`)."""
        from tasks.tts.data import load_corpus

        corpus = load_corpus(config)
        run.extra.update(model=self.model_name, data=str(corpus.data), train_clips=len(corpus.train),
                         test_clips=[u.clip_id for u in corpus.test])
        run.extra |= self.targets(config, corpus, run)
        return corpus

    def targets(self, config: TTSConfig, corpus: Any, run: RunContext) -> dict[str, Any]:
        """Model-specific targets (FastSpeech 2's durations, pitch and energy); returns notes."""
        return {}

    def build(self, config: TTSConfig, attention: Mapping[str, AttentionChoice], data: Any,
              run: RunContext) -> nn.Module:
        from tasks.tts.data import FEATURES, CharacterVocabulary

        model, replaced = self.build_model(len(CharacterVocabulary()), FEATURES.n_mels, config.size,
                                           attention)
        run.extra["attention_modules"] = {role: len(paths) for role, paths in replaced.items()}
        return model.to(run.device)

    def build_model(self, vocabulary: int, n_mels: int, size: Any,
                    attention: Mapping[str, AttentionChoice]) -> tuple[nn.Module, dict]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Sequence[Any], corpus: Any, device: str) -> Tensor:
        """ESPnet's training loss of the model on ``batch``."""
        raise NotImplementedError

    def synthesize(self, model: nn.Module, utterance: Any, config: TTSConfig, device: str) -> Tensor:
        """[T, n_mels] predicted log-mel (normalised) from the characters alone."""
        raise NotImplementedError

    def train(self, model: nn.Module, config: TTSConfig, corpus: Any, run: RunContext) -> None:
        """Adam with linear warm-up, random batches of training clips; the loss per step goes
        to ``run.extra["loss_curve"]``."""
        generator = run.generator()
        optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1)))
        losses = []
        model.train()
        for _ in range(config.steps):
            order = torch.randperm(len(corpus.train), generator=generator)[: config.batch_size]
            loss = self.loss(model, [corpus.train[int(i)] for i in order], corpus, run.device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.name}: non-finite training loss {loss.item()}")
            optimiser.zero_grad()
            loss.backward()
            if config.clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        run.extra["loss_curve"] = losses

    @torch.no_grad()
    def evaluate(self, model: nn.Module, config: TTSConfig, corpus: Any, run: RunContext) -> dict[str, float]:
        """Synthesize each test clip, vocode, write WAVs and a figure, score against the reference."""
        from tasks.tts import metrics as tts_metrics
        from tasks.tts.vocoder import griffin_lim, plot_mels, write_wav

        model.eval()
        audio_dir = run.workdir / "audio"
        audio_dir.mkdir(exist_ok=True)
        scores: dict[str, list[float]] = {name: [] for name in (*(m.name for m in self.metrics),
                                                                "cab_mcd", "cab_msd")}
        # Frame counts explain CAB's per-synthesized-frame scores (a short output inflates them).
        artifacts: dict[str, Any] = {"audio": [], "figure": None, "frames": {}}
        for utterance in corpus.test:
            generated = self.synthesize(model, utterance, config, run.device).cpu()
            predicted = corpus.mel.inverse(generated).numpy()
            synthesized = griffin_lim(predicted, iterations=config.griffin_lim_iterations)
            artifacts["frames"][utterance.clip_id] = {"synthesized": len(predicted),
                                                      "reference": utterance.frames}
            reference = griffin_lim(utterance.mel.numpy(), iterations=config.griffin_lim_iterations)
            scores["mcd"].append(tts_metrics.mcd(synthesized, reference))
            scores["msd"].append(tts_metrics.msd(synthesized, reference))
            scores["length_ratio"].append(len(predicted) / utterance.frames)
            scores["cab_mcd"].append(tts_metrics.cab_mcd(synthesized, reference))
            scores["cab_msd"].append(tts_metrics.cab_msd(synthesized, reference))
            for kind, audio in (("synthesized", synthesized), ("reference", reference)):
                path = audio_dir / f"{utterance.clip_id}_{kind}.wav"
                write_wav(path, audio)
                artifacts["audio"].append(str(path))
            if artifacts["figure"] is None:
                figure = run.workdir / f"mel_{utterance.clip_id}.png"
                plot_mels(figure, [("reference (ground truth)", utterance.mel.numpy()),
                                   (f"synthesized ({self.model_name})", predicted)],
                          title=f"{utterance.clip_id}: {self.model_name}")
                artifacts["figure"] = str(figure)
        run.extra["artifacts"] = artifacts
        return {name: float(np.mean(values)) for name, values in scores.items()}


@register_task
class FastSpeech2Task(_TTSTask):
    """ESPnet2's FastSpeech 2 with durations from the project's own aligner."""

    name = "tts_fastspeech2"
    roles = FASTSPEECH2_ROLES
    model_name = "FastSpeech 2"

    def targets(self, config: TTSConfig, corpus: Any, run: RunContext) -> dict[str, Any]:
        """Durations (shipped ``durations.txt`` or a fresh aligner run), token pitch and energy.

        Pitch is the token average of log F0 over voiced frames, energy the token average of
        frame energy; both are standardised with training-set statistics, as ESPnet does.
        """
        from tasks.tts.align import attach_durations, read_durations, run_aligner, write_durations
        from tasks.tts.data import Normaliser, token_average

        source = corpus.data / "durations.txt"
        notes: dict[str, Any] = {}
        if source.is_file():
            durations = read_durations(source)
        else:
            durations, report = run_aligner(corpus.data, steps=config.aligner_steps, seed=run.seed)
            source = run.workdir / "durations.txt"
            write_durations(source, durations, header=f"aligner run by {self.name}: {asdict(report)}")
            notes["aligner"] = asdict(report)
        notes["durations"] = str(source)
        everything = corpus.train + corpus.test
        attach_durations(everything, durations, source)
        for u in everything:
            log_f0 = torch.where(u.pitch > 0, u.pitch.clamp(min=1.0).log(), torch.zeros_like(u.pitch))
            u.token_pitch = token_average(log_f0, u.durations, skip_zeros=True)  # [N + 1]
            u.token_energy = token_average(u.energy, u.durations, skip_zeros=False)  # [N + 1]
        voiced = torch.cat([u.token_pitch[u.token_pitch != 0] for u in corpus.train])
        corpus.pitch = Normaliser(voiced.mean(), voiced.std().clamp(min=1e-5))
        corpus.energy = Normaliser.fit([u.token_energy[:-1] for u in corpus.train])
        return notes

    def build_model(self, vocabulary, n_mels, size, attention):
        from tasks.tts.model import build_fastspeech2

        return build_fastspeech2(vocabulary, n_mels, size, attention)

    def loss(self, model, batch, corpus, device):
        from tasks.tts.data import pad

        tokens, token_lengths = pad([u.tokens for u in batch])
        mels, frame_lengths = pad([corpus.mel(u.mel) for u in batch])
        durations, duration_lengths = pad([u.durations for u in batch])
        # Unvoiced tokens keep 0 after standardising (the mean), as in ESPnet's token averaging.
        pitch, _ = pad([torch.where(u.token_pitch != 0, corpus.pitch(u.token_pitch), 0.0) for u in batch])
        energy, _ = pad([corpus.energy(u.token_energy) for u in batch])
        loss, _, _ = model(
            text=tokens.to(device), text_lengths=token_lengths.to(device), feats=mels.to(device),
            feats_lengths=frame_lengths.to(device), durations=durations.to(device),
            durations_lengths=duration_lengths.to(device), pitch=pitch[..., None].to(device),
            pitch_lengths=duration_lengths.to(device), energy=energy[..., None].to(device),
            energy_lengths=duration_lengths.to(device),
        )
        return loss

    def synthesize(self, model, utterance, config, device):
        return model.inference(utterance.tokens.to(device))["feat_gen"]


@register_task
class TransformerTTSTask(_TTSTask):
    """ESPnet2's Transformer-TTS, synthesizing autoregressively until the stop token."""

    name = "tts_transformer"
    roles = TRANSFORMER_ROLES
    model_name = "Transformer-TTS"

    def build_model(self, vocabulary, n_mels, size, attention):
        from tasks.tts.model import build_transformer

        return build_transformer(vocabulary, n_mels, size, attention)

    def loss(self, model, batch, corpus, device):
        from tasks.tts.data import pad

        tokens, token_lengths = pad([u.tokens for u in batch])
        mels, frame_lengths = pad([corpus.mel(u.mel) for u in batch])
        loss, _, _ = model(text=tokens.to(device), text_lengths=token_lengths.to(device),
                           feats=mels.to(device), feats_lengths=frame_lengths.to(device))
        return loss

    def synthesize(self, model, utterance, config, device):
        from tasks.tts.model import generate_transformer

        return generate_transformer(model, utterance.tokens.to(device), maxlenratio=config.maxlenratio)
