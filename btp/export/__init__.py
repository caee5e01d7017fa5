"""Export: a btp checkpoint -> one self-describing model.onnx (``btp.export.onnx``) and Triton
repositories (``btp.export.triton``); TensorRT engines are built by ``btp.runtime.tensorrt`` (the
runtime builds them on demand too). Option checks: ``btp.export.formats``."""
