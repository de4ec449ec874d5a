"""tf.data input pipelines: synthetic Flying Chairs generated on the fly, augmentation, real datasets.

Every element is a dict with `image1`, `image2` (float32 [0, 1] RGB, H x W x 3), `flow` (float32 H x W x 2)
and `valid` (float32 H x W); sources may add `occlusion` (float32 H x W, 1 = occluded in frame 2).
"""
