"""The bundled data and what scores it (core layer), plus the scripts that train and sample the
bundled models (the commands ``python -m smoothness.train`` and ``.sample``).

* ``digits``: scikit-learn's 8x8 digits at 16x16 pixels, and the moving-digits videos (re-exported here);
* ``classifier``: the small CNN that scores generated digits;
* ``train``, ``sample``: the training and sampling scripts (app layer: they may import anything).

``digits`` and ``classifier`` import only the models and the I/O helpers.
"""
from .digits import (
                     DIGIT,
                     FRAMES,
                     GLYPHS,
                     HELD_OUT,
                     ROOM,
                     SIZE,
                     SPEEDS,
                     SPLIT_SEED,
                     Digits,
                     bounce,
                     downsample,
                     load,
                     load_videos,
                     moving_digits,
                     random_motion,
                     render,
                     upsample,
                     video_batch,
)

__all__ = ["DIGIT", "Digits", "FRAMES", "GLYPHS", "HELD_OUT", "ROOM", "SIZE", "SPEEDS", "SPLIT_SEED", "bounce",
           "downsample", "load", "load_videos", "moving_digits", "random_motion", "render", "upsample",
           "video_batch"]
