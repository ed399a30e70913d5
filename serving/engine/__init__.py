"""The engine: plain PyTorch and transformers, no Ray and no gRPC. Requests, the shared encode path, the prompt bank, sampling, the static decoder and the plan/outputs contract with the scheduler."""
