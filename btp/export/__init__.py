"""Export: a btp checkpoint -> one self-describing model.onnx (``btp.export.onnx``); TensorRT engines
(``btp.export.tensorrt``, GPU work). The formats are declared once in ``btp.export.formats``."""
