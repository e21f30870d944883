"""A small Telugu CTC recogniser trained here on espeak-ng speech: an instrument for intelligibility.

It hears espeak-ng-like Telugu (the project's own synthetic voices and what codecs make of them), not
real speakers; its figures count only beside its CER on clean held-out espeak-ng speech (recipe.json).
One idea per module, data flowing one way:

    alphabet   Telugu characters (U+0C00-U+0C7F) + space as CTC labels (blank = 0); text -> labels -> text
    features   log-mel 80 bins, 10 ms hop at 16 kHz, normalised per utterance and per bin
    sentences  the recogniser's own generated sentences, and every sentence the project trains or scores on
               (they must never meet: `assert_disjoint`)
    speech     espeak-ng renderings across voices, rates, pitches and light noise -> feature sets
    model      convolutions (stride 3) + BiLSTM + a linear layer to the labels; save/load with its recipe
    decode     greedy CTC decoding, with word times from the frames that emitted them
    train      resumable training with SpecAugment, CER curve, the shipped folder (`python -m agent.train asr`)
    backend    `CtcTranscriber`, the `ctc[:FOLDER]` backend of agent.eval.asr
"""
