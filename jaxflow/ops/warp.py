"""Backward bilinear warping (placeholder: being written)."""


def warp(image, flow):
  raise NotImplementedError


def warp_with_mask(image, flow):
  raise NotImplementedError
