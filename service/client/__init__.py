"""A Python client for resnet-serve's REST API (`pip install 'resnet-serve[client]'`).

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        for top in client.predict(["cat.jpg", "dog.jpg"], top_k=3):
            print(top[0].label, top[0].score)
        vectors = client.embed(["cat.jpg", "dog.jpg"])  # float32, shape (2, 2048)

`AsyncClient` has the same calls, awaited. Images may be paths, bytes, PIL images or
uint8 numpy arrays. Failures raise `ServiceError` subclasses carrying the service's error
code; 429 and 503 are retried within a budget, honouring `Retry-After`.

It imports httpx and nothing of the server (no FastAPI, no ONNX Runtime); Pillow and
numpy only when images or embeddings need them.
"""

from service.client.api import Prediction
from service.client.clients import AsyncClient, Client
from service.client.errors import (
    BadInput,
    ConnectionFailed,
    DeadlineExceeded,
    Overloaded,
    ServerFault,
    ServiceError,
    Timeout,
    Unauthorized,
    Unavailable,
)
from service.client.images import ImageInput, Images
from service.client.retry import RetryPolicy

__all__ = [
    "AsyncClient",
    "BadInput",
    "Client",
    "ConnectionFailed",
    "DeadlineExceeded",
    "ImageInput",
    "Images",
    "Overloaded",
    "Prediction",
    "RetryPolicy",
    "ServerFault",
    "ServiceError",
    "Timeout",
    "Unauthorized",
    "Unavailable",
]
