"""CXR text-to-image diffusion pipelines (installed as ``diffmem.pipelines``)."""
