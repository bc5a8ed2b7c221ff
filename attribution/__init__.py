"""Token attribution and risky-token scanning (installed as ``diffmem.attribution``)."""
