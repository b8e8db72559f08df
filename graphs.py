"""OneFlow static-graph (nn.Graph) wrappers for training and inference, used with --graph.

A graph is compiled on its first call and reuses the same modules (so the same parameters and the same
checkpoints as eager mode). Each graph is traced in the module's mode at its first call: the training
graph in train(), the inference graph in eval() (BatchNorm statistics), so callers switch the mode
before calling. Input shapes are fixed per graph; `InferenceGraphs` keeps one graph per input shape.
"""
import oneflow as flow


class TrainGraph(flow.nn.Graph):
    """One optimisation step: forward, loss, backward, optimizer and scheduler step."""

    def __init__(self, model, criterion, optimizer, scheduler=None, amp=False):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.add_optimizer(optimizer, lr_sch=scheduler)
        if amp:  # CUDA only: mixed precision with dynamic loss scaling
            self.config.enable_amp(True)
            self.set_grad_scaler(flow.amp.GradScaler(init_scale=2 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000))

    def build(self, *batch):
        loss = self.criterion(self.model(batch[0]), *batch[1:])
        loss.backward()
        return loss


class InferenceGraph(flow.nn.Graph):
    def __init__(self, model, amp=False):
        super().__init__()
        self.model = model
        if amp:
            self.config.enable_amp(True)

    def build(self, image):
        return self.model(image)


class InferenceGraphs:
    """model(x) in eval mode through one compiled graph per input shape (compiling costs seconds)."""

    def __init__(self, model, amp=False):
        self.model, self.amp, self.graphs = model, amp, {}

    def __call__(self, x):
        key = tuple(x.shape)
        if key not in self.graphs:
            self.model.eval()
            self.graphs[key] = InferenceGraph(self.model, self.amp)
        return self.graphs[key](x)
