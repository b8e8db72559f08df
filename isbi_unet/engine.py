"""How a model trains and predicts: eagerly (on one process or under DDP) or through nn.Graph.

Both engines have one interface, so the training loop and the checkpoints need no mode branches:

    engine.train_step(image, label[, weight])  -> loss tensor; one optimizer (and scheduler) step
    engine.infer(x)                            -> logits, running no collective (ranks may score different slices)
    engine.state_dict() / load_state_dict(checkpoint, steps_done)   the optimizer's state in a checkpoint

A graph is compiled on its first call and shares the module's parameters, so both modes read and
write the same checkpoints. Each graph is traced in the module's mode at its first call; input
shapes are fixed per graph, so `InferenceGraphs` keeps one per input shape.
"""

import oneflow as flow


class EagerEngine:
    """Eager mode; with `distributed`, DistributedDataParallel all-reduces gradients in backward."""

    name = "eager"

    def __init__(self, model, criterion, optimizer, scheduler=None, distributed=False):
        # DDP adds hooks to the module itself (and broadcasts rank 0's weights), so `model` stays the model.
        self.model = flow.nn.parallel.DistributedDataParallel(model) if distributed else model
        self.criterion, self.optimizer, self.scheduler = criterion, optimizer, scheduler

    def train_step(self, image, *target):
        loss = self.criterion(self.model(image), *target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss

    def infer(self, x):
        return self.model.forward(x)  # .forward skips DDP's hooks, which broadcast buffers (a collective)

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, checkpoint, steps_done, lr):
        """Adam's moments from `checkpoint`; this run's `lr`; the schedule moved to `steps_done`.

        Returns a note when the checkpoint was written by the other engine, whose state does not carry over.
        """
        note = None
        if checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            for group in self.optimizer.param_groups:
                group["lr"] = lr  # this run's --lr, not the stored one
        elif checkpoint.get("graph") is not None:
            note = "holds graph optimizer state; Adam's moments restart"
        if self.scheduler is not None:
            # Rebuilt for this run's --epochs rather than loaded, then moved to where the checkpoint stopped.
            self.scheduler.last_step = steps_done - 1
            self.scheduler.step()
        return note


class TrainGraph(flow.nn.Graph):
    """One optimisation step: forward, loss, backward, optimizer and scheduler step."""

    def __init__(self, model, criterion, optimizer, scheduler=None, amp=False):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.add_optimizer(optimizer, lr_sch=scheduler)
        if amp:  # CUDA only: mixed precision with dynamic loss scaling
            self.config.enable_amp(True)
            scaler = flow.amp.GradScaler(init_scale=2**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000)
            self.set_grad_scaler(scaler)

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


class GraphEngine:
    """nn.Graph on one process: the step and each inference shape compiled once (AMP on CUDA)."""

    name = "graph"

    def __init__(self, model, criterion, optimizer, scheduler=None, amp=False):
        self.model = model
        self.graph = TrainGraph(model, criterion, optimizer, scheduler, amp=amp)
        self.infer = InferenceGraphs(model, amp=amp)

    def train_step(self, *batch):
        return self.graph(*batch)

    def state_dict(self):
        # The graph keeps Adam's moments and its step counter itself; the nested entries are the modules'.
        return {"graph": {k: v for k, v in self.graph.state_dict().items() if not isinstance(v, dict)}}

    def load_state_dict(self, checkpoint, steps_done, lr):
        if checkpoint.get("graph"):
            self.graph.load_state_dict({"model": self.model.state_dict(), "criterion": {}, **checkpoint["graph"]})
            return None
        if checkpoint.get("optimizer") is not None:
            return "holds eager optimizer state; Adam's moments and the lr schedule restart"
        return None
