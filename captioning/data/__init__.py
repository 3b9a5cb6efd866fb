"""Caption datasets: file formats, image decoding, synthetic shapes, transforms and batching."""
