#!/usr/bin/env python
"""Step time of KD vs KD+OPDF (paper's BERT selection, L=1) on a BERT-base-shaped stack: 2-layer student
<- 4-layer teacher (the 6 <- 12 ratio), 768 wide, FFN 3072, batch 8 x 128 tokens, CPU float32.

Usage: OMP_NUM_THREADS=2 python tools/bert_step_cost.py [num_dummy]   (needs transformers; about 2 minutes)
"""
import statistics, sys, time
import torch, torch.nn.functional as F
from transformers import BertConfig, AutoModelForSequenceClassification
from opdf_torchdistill import overparameterize
from opdf_torchdistill.plugin.probe import attach_probe
from opdf_torchdistill.alignment import CoreAligner

torch.manual_seed(0)
def bert(layers):
    cfg = BertConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072, num_labels=2)
    return AutoModelForSequenceClassification.from_config(cfg)
teacher = bert(4).eval()
for p in teacher.parameters(): p.requires_grad_(False)
kd, op = bert(2), bert(2)
op.load_state_dict(kd.state_dict())
t0 = time.perf_counter(); rep = overparameterize(op, selection='bert', num_dummy=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
print(f'decomposition {time.perf_counter() - t0:.1f} s; student params x{rep.ratio:.3f}')
attach_probe(op); attach_probe(teacher)
aligner = CoreAligner()
x = torch.randint(0, 30000, (8, 128)); y = torch.randint(0, 2, (8,))
opts = {id(kd): torch.optim.AdamW(kd.parameters(), lr=1e-5), id(op): torch.optim.AdamW(op.parameters(), lr=1e-5)}
def step(model, align):
    t_logits = teacher(input_ids=x).logits  # frozen: no graph (the probe reports per grad mode)
    s_logits = model(input_ids=x).logits
    loss = 0.9 * F.kl_div(F.log_softmax(s_logits / 5, -1), F.softmax(t_logits / 5, -1), reduction='batchmean') * 25 + 0.1 * F.cross_entropy(s_logits, y)
    if align:
        loss = loss + 0.1 * aligner.loss(op.opdf(), teacher.opdf())
    opts[id(model)].zero_grad(); loss.backward(); opts[id(model)].step()
times = {'kd': [], 'opdf': []}
for r in range(5):
    for name, model, align in (('kd', kd, False), ('opdf', op, True)):
        t = time.perf_counter(); step(model, align); dt = time.perf_counter() - t
        if r > 0: times[name].append(dt)
m = {k: statistics.median(v) for k, v in times.items()}
print({k: [round(t, 3) for t in v] for k, v in times.items()})
print(f"median step: KD {m['kd']:.3f} s, KD+OPDF {m['opdf']:.3f} s, ratio {m['opdf'] / m['kd']:.2f}")
