"""AdaQuant's onnxruntime-training engine: the layer's loss graph (``layer_graph``), the worker that
trains it in the separate training environment (``worker``), and the driver of that worker (``engine``)."""
