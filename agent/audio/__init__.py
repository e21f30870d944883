"""Audio in and out, one idea per module:

    stream   client audio -> exact 24 kHz mono 1920-sample frames: streaming resampling, framing, μ-law
    files    the one reader of sound files: any file -> mono (or per-channel) float32 at 24 kHz
    espeak   the one runner of the espeak-ng command: text -> speech as an array (test and evaluation speech)
"""
