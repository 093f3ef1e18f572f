"""Layer 2 of 5: videos and datasets: decoding, frame sampling, dataset adapters and manifests, the demo world,
the official lists. Imports core only."""
