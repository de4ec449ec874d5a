"""Cost volume by shifted dot products (placeholder: being written)."""


def correlation(f1, f2, max_displacement, stride=1):
  raise NotImplementedError
