"""Character durations for FastSpeech 2 from an aligner the project trains itself.

The aligner is the unsupervised alignment learning of RAD-TTS (Badlani et al., "One TTS
Alignment To Rule Them All", ICASSP 2022): two small convolutional encoders embed characters
and mel frames; the soft alignment of frame t to character n is a softmax over n of their
negative squared distance, multiplied by a beta-binomial prior that favours the diagonal. It
is trained with the forward-sum loss (the likelihood of all monotonic alignments, computed by
``torch.nn.functional.ctc_loss``), and durations are read off the best monotonic path of the
soft alignment (monotonic alignment search, Glow-TTS). Every character gets at least one frame.

Run it on a dataset (writes ``durations.txt`` next to ``metadata.csv`` unless told otherwise)::

    attnbench data prepare ljspeech_durations --data ~/.cache/attnbench/data/LJSpeech-1.1 --steps 2000
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import betabinom
from torch import Tensor, nn

from tasks.tts.data import (
    SAMPLE_ROOT,
    CharacterVocabulary,
    Normaliser,
    Utterance,
    extract,
    pad,
    read_ljspeech,
    split_clips,
)


class AlignmentModel(nn.Module):
    """Soft alignment of mel frames to characters.

    Args:
        vocabulary_size: number of character ids.
        n_mels: mel bands.
        channels: embedding width of both encoders.
    """

    def __init__(self, vocabulary_size: int, n_mels: int, channels: int = 64) -> None:
        super().__init__()
        # Mel statistics of the training clips, set by train_aligner.
        self.normaliser: Normaliser | None = None
        self.embedding = nn.Embedding(vocabulary_size, channels, padding_idx=0)
        self.text_encoder = nn.Sequential(
            nn.Conv1d(channels, channels, 5, padding=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 5, padding=2), nn.ReLU())
        # Spelling is context-dependent ("gh", silent "e"): a bidirectional LSTM sees the word.
        self.text_context = nn.LSTM(channels, channels // 2, batch_first=True, bidirectional=True)
        self.mel_encoder = nn.Sequential(
            nn.Conv1d(n_mels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv1d(channels, channels, 1))

    def forward(self, tokens: Tensor, token_lengths: Tensor, mels: Tensor, frame_lengths: Tensor) -> Tensor:
        """Log alignment probabilities with the prior applied.

        Args:
            tokens: [B, N] character ids (0 = padding).
            token_lengths: [B].
            mels: [B, T, n_mels] normalised log-mel.
            frame_lengths: [B].

        Returns:
            [B, T, N] log P(character n | frame t), about -1e4 at padded characters.
        """
        text = self.text_encoder(self.embedding(tokens).transpose(1, 2)).transpose(1, 2)  # [B, N, C]
        text, _ = self.text_context(text)  # [B, N, C]
        frames = self.mel_encoder(mels.transpose(1, 2)).transpose(1, 2)  # [B, T, C]
        # Squared distances expanded by hand: cdist's square root has no gradient at 0.
        distance = (frames.pow(2).sum(-1, keepdim=True) + text.pow(2).sum(-1)[:, None, :]
                    - 2 * frames @ text.transpose(1, 2)).clamp(min=0) / text.shape[-1]  # [B, T, N]
        padded = torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= token_lengths[:, None]
        # A large finite value, not -inf: CTC's backward turns -inf inputs into NaN gradients.
        logits = (-distance).masked_fill(padded[:, None, :], -1e4)
        log_prior = torch.stack([
            nn.functional.pad(beta_binomial_prior(int(n), int(t)), (0, tokens.shape[1] - int(n),
                                                                     0, mels.shape[1] - int(t)))
            for n, t in zip(token_lengths, frame_lengths)
        ]).to(mels.device)  # [B, T, N]
        log_attention = torch.log_softmax(logits, dim=-1) + log_prior
        return torch.log_softmax(log_attention.masked_fill(padded[:, None, :], -1e4), dim=-1)


@functools.lru_cache(maxsize=1024)
def beta_binomial_prior(tokens: int, frames: int, scaling: float = 1.0) -> Tensor:
    """[frames, tokens] log prior: frame t's character ~ BetaBinomial(tokens - 1, a t, a (T - t + 1))."""
    t = np.arange(1, frames + 1)[:, None]
    n = np.arange(tokens)[None, :]
    log_pmf = betabinom(tokens - 1, scaling * t, scaling * (frames + 1 - t)).logpmf(n)
    return torch.from_numpy(np.maximum(log_pmf, -1e4).astype(np.float32))


def forward_sum_loss(log_attention: Tensor, token_lengths: Tensor, frame_lengths: Tensor,
                     blank_log_probability: float = -1.0) -> Tensor:
    """Negative log-likelihood of all monotonic alignments, per frame (RAD-TTS's loss).

    Each frame emits one character; CTC over targets ``1..N`` with a never-preferred blank
    sums over every monotonic path that visits each character.
    """
    batch, frames, _ = log_attention.shape
    blank = log_attention.new_full((batch, frames, 1), blank_log_probability)
    log_probs = torch.log_softmax(torch.cat([blank, log_attention], dim=-1), dim=-1)  # [B, T, N + 1]
    targets = torch.arange(1, log_attention.shape[2] + 1, device=log_attention.device).expand(batch, -1)
    loss = nn.functional.ctc_loss(log_probs.transpose(0, 1), targets, frame_lengths, token_lengths,
                                  blank=0, reduction="sum", zero_infinity=True)
    return loss / frame_lengths.sum()


def monotonic_alignment_search(log_probability: np.ndarray) -> np.ndarray:
    """Durations of the most probable monotonic alignment (Glow-TTS's MAS).

    Args:
        log_probability: [T, N] log score of frame t on character n, T >= N.

    Returns:
        [N] frames per character (each >= 1, summing to T).
    """
    frames, tokens = log_probability.shape
    if frames < tokens:
        raise ValueError(f"cannot align {tokens} characters to only {frames} frames")
    best = np.full((frames, tokens), -np.inf)
    came_from_previous = np.zeros((frames, tokens), dtype=bool)
    best[0, 0] = log_probability[0, 0]
    for t in range(1, frames):
        stay = best[t - 1]
        advance = np.concatenate([[-np.inf], best[t - 1, :-1]])
        came_from_previous[t] = advance > stay
        best[t] = np.maximum(stay, advance) + log_probability[t]
    durations = np.zeros(tokens, dtype=np.int64)
    n = tokens - 1
    for t in range(frames - 1, -1, -1):
        durations[n] += 1
        if t > 0 and came_from_previous[t, n]:
            n -= 1
    return durations


@dataclass
class AlignerReport:
    """How the aligner trained and how well its durations explain the spectrogram."""

    steps: int
    final_loss: float
    explained_variance: float
    uniform_explained_variance: float
    pauses_at_boundaries: float
    uniform_pauses_at_boundaries: float


def explained_variance(mels: Sequence[Tensor], durations: Sequence[Tensor]) -> float:
    """Share of log-mel variance explained by one mean spectrum per character segment.

    1 - (squared error of the segment means) / (squared error of the utterance mean), pooled
    over the clips: 0 for durations unrelated to the audio's changes, higher for segments that
    follow them.
    """
    residual = total = 0.0
    for mel, duration in zip(mels, durations):
        token_of_frame = torch.repeat_interleave(torch.arange(duration.shape[0]), duration)  # [T]
        sums = torch.zeros(duration.shape[0], mel.shape[1]).index_add_(0, token_of_frame, mel)
        means = sums / duration.clamp(min=1)[:, None].float()
        residual += float((mel - means[token_of_frame]).pow(2).sum())
        total += float((mel - mel.mean(0)).pow(2).sum())
    return 1.0 - residual / total


def pause_placement(utterances: Sequence[Utterance], durations: Sequence[Tensor],
                    vocabulary: CharacterVocabulary, *, min_frames: int = 8,
                    below_peak_db: float = 40.0) -> float:
    """Share of the pauses inside utterances that the durations give to a space or punctuation.

    A pause is a run of at least ``min_frames`` frames (8 frames: 93 ms) whose energy is more
    than ``below_peak_db`` under the clip's loudest frame, not touching the clip's start or end;
    it is attributed to the character covering its middle frame. Speakers pause between words
    and at punctuation, so a good alignment scores near 1; spaces and punctuation are about a
    fifth of LJSpeech's characters, which is what durations unrelated to the audio score.
    """
    boundaries = {i for i, token in enumerate(vocabulary.tokens) if token in " !\"'(),-.:;?"}
    placed = total = 0
    for u, duration in zip(utterances, durations):
        level = 20 * torch.log10(u.energy.clamp(min=1e-8) / u.energy.max())  # [T] dB under peak
        quiet = (level < -below_peak_db).tolist()
        token_of_frame = torch.repeat_interleave(torch.arange(duration.shape[0]), duration)  # [T]
        start = None
        for t, is_quiet in enumerate([*quiet, False]):
            if is_quiet and start is None:
                start = t
            elif not is_quiet and start is not None:
                if start > 0 and t < len(quiet) and t - start >= min_frames:
                    total += 1
                    placed += int(u.tokens[int(token_of_frame[(start + t) // 2])]) in boundaries
                start = None
    return placed / max(total, 1)


def uniform_durations(tokens: int, frames: int) -> Tensor:
    """[tokens] frames split as evenly as possible (the baseline the aligner must beat)."""
    edges = np.round(np.linspace(0, frames, tokens + 1)).astype(np.int64)
    return torch.from_numpy(np.diff(edges))


def train_aligner(train: Sequence[Utterance], vocabulary_size: int, *, steps: int, seed: int,
                  batch_size: int = 8, lr: float = 1e-3) -> AlignmentModel:
    """Train the alignment model on ``train`` with the forward-sum loss."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    normaliser = Normaliser.fit([u.mel for u in train])
    model = AlignmentModel(vocabulary_size, train[0].mel.shape[1])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        order = torch.randperm(len(train), generator=generator)[:batch_size]
        batch = [train[int(i)] for i in order]
        tokens, token_lengths = pad([u.tokens for u in batch])
        mels, frame_lengths = pad([normaliser(u.mel) for u in batch])
        loss = forward_sum_loss(model(tokens, token_lengths, mels, frame_lengths), token_lengths,
                                frame_lengths)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.normaliser = normaliser
    return model


@torch.no_grad()
def align(model: AlignmentModel, utterances: Sequence[Utterance]) -> dict[str, Tensor]:
    """Durations ([N + 1], the last 0 for ESPnet's <sos/eos>) of each utterance, by clip id."""
    model.eval()
    durations = {}
    for u in utterances:
        log_attention = model(u.tokens[None], torch.tensor([len(u.tokens)]),
                              model.normaliser(u.mel)[None], torch.tensor([u.frames]))[0]  # [T, N]
        path = monotonic_alignment_search(log_attention.numpy())
        durations[u.clip_id] = torch.from_numpy(np.append(path, 0))
    return durations


def write_durations(path: Path, durations: Mapping[str, Tensor], header: str) -> None:
    """One line per clip: ``ID d_1 ... d_N 0``; ``header`` lines are written as # comments."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{clip_id} {' '.join(str(int(d)) for d in dur)}" for clip_id, dur in durations.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_durations(path: Path) -> dict[str, Tensor]:
    """The durations written by :func:`write_durations`."""
    durations = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            clip_id, *values = line.split()
            durations[clip_id] = torch.tensor([int(v) for v in values], dtype=torch.long)
    return durations


def attach_durations(utterances: Sequence[Utterance], durations: Mapping[str, Tensor], source: Path) -> None:
    """Set each utterance's durations, checking they fit its characters and frames."""
    for u in utterances:
        if u.clip_id not in durations:
            raise KeyError(f"{source} has no durations for {u.clip_id}; "
                           "re-run attnbench data prepare ljspeech_durations")
        d = durations[u.clip_id]
        if d.shape[0] != len(u.tokens) + 1 or int(d.sum()) != u.frames:
            raise ValueError(
                f"{source}: durations of {u.clip_id} ({d.shape[0]} values summing to {int(d.sum())}) "
                f"do not fit {len(u.tokens)} characters + <sos/eos> and {u.frames} frames; "
                "re-run attnbench data prepare ljspeech_durations"
            )
        u.durations = d


def run_aligner(data: Path, *, steps: int, seed: int) -> tuple[dict[str, Tensor], AlignerReport]:
    """Extract features, train the aligner on the train split, align every clip, and measure."""
    vocabulary = CharacterVocabulary()
    splits = split_clips(read_ljspeech(data))
    utterances = {name: [extract(c, vocabulary) for c in clips] for name, clips in splits.items()}
    model = train_aligner(utterances["train"], len(vocabulary), steps=steps, seed=seed)
    everything = [u for name in ("train", "dev", "test") for u in utterances[name]]
    durations = align(model, everything)
    held_out = utterances["test"]
    train_tokens, train_token_lengths = pad([u.tokens for u in utterances["train"]])
    train_mels, train_frame_lengths = pad([model.normaliser(u.mel) for u in utterances["train"]])
    with torch.no_grad():
        final_loss = float(forward_sum_loss(
            model(train_tokens, train_token_lengths, train_mels, train_frame_lengths),
            train_token_lengths, train_frame_lengths))
    mels = [model.normaliser(u.mel) for u in held_out]
    learned = [durations[u.clip_id] for u in held_out]
    uniform = [torch.cat([uniform_durations(len(u.tokens), u.frames), torch.zeros(1, dtype=torch.long)])
               for u in held_out]
    # Pauses are rare in four test clips: count them over every clip (the aligner never sees energy).
    report = AlignerReport(
        steps=steps,
        final_loss=final_loss,
        explained_variance=explained_variance(mels, learned),
        uniform_explained_variance=explained_variance(mels, uniform),
        pauses_at_boundaries=pause_placement(everything, [durations[u.clip_id] for u in everything],
                                             vocabulary),
        uniform_pauses_at_boundaries=pause_placement(
            everything, [torch.cat([uniform_durations(len(u.tokens), u.frames),
                                    torch.zeros(1, dtype=torch.long)]) for u in everything], vocabulary),
    )
    return durations, report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="attnbench data prepare ljspeech_durations",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE_ROOT, help="LJSpeech folder")
    parser.add_argument("--out", type=Path, default=None, help="default: DATA/durations.txt")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    durations, report = run_aligner(args.data, steps=args.steps, seed=args.seed)
    header = (f"character durations (frames of 256 samples) from tasks/tts/align.py, "
              f"--steps {args.steps} --seed {args.seed}\n"
              f"forward-sum loss per frame {report.final_loss:.3f}; held-out test clips: segment means "
              f"explain {report.explained_variance:.3f} of log-mel variance "
              f"(uniform durations: {report.uniform_explained_variance:.3f}); all clips: "
              f"{report.pauses_at_boundaries:.2f} of pauses fall on a space or punctuation "
              f"(uniform durations: {report.uniform_pauses_at_boundaries:.2f})")
    out = args.out or args.data / "durations.txt"
    write_durations(out, durations, header)
    print(header)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
