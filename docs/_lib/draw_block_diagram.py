"""Draws docs/assets/parallel-block.svg, the hook-point diagram of concepts/hook-points.md (a static file, so
the page needs no JavaScript): `python docs/_lib/draw_block_diagram.py docs/assets/parallel-block.svg`."""
import sys

W, H = 820, 900
out = []
a = out.append
a(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
  'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="13">')
a('<title>A parallel-residual GPT-NeoX block and its hook points</title>')
a('<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
  'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#37474f"/></marker></defs>')
a('<style>.box{fill:#e8eaf6;stroke:#3f51b5;stroke-width:1.2}.io{fill:#fff3e0;stroke:#e65100;stroke-width:1.2}'
  '.flag{fill:#fafafa;stroke:#9e9e9e;stroke-dasharray:5 3}.ln{stroke:#37474f;stroke-width:1.4;fill:none}'
  '.hook{font-family:DejaVu Sans Mono, Menlo, Consolas, monospace;font-size:12px;fill:#b71c1c}'
  '.note{font-size:12px;fill:#455a64}'
  '.flagtext{font-family:DejaVu Sans Mono, monospace;font-size:11px;fill:#757575}</style>')
a(f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>')

def box(x, y, w, h, text, cls="box", tcls=None, size=None):
    a(f'<rect class="{cls}" x="{x}" y="{y}" width="{w}" height="{h}" rx="5"/>')
    lines = text.split("\n")
    for i, line in enumerate(lines):
        ty = y + h / 2 + (i - (len(lines) - 1) / 2) * 15 + 4.5
        extra = f' class="{tcls}"' if tcls else ""
        fs = f' font-size="{size}"' if size else ""
        a(f'<text x="{x + w / 2}" y="{ty}" text-anchor="middle"{extra}{fs}>{line}</text>')

def arrow(points):
    pts = " ".join(f"{x},{y}" for x, y in points)
    a(f'<polyline class="ln" points="{pts}" marker-end="url(#arr)"/>')

def hook(x, y, text, anchor="start"):
    a(f'<text class="hook" x="{x}" y="{y}" text-anchor="{anchor}">{text}</text>')

RX, AX, MX = 60, 330, 640          # residual, attention, MLP column centres
AW, MW = 300, 264
# input
box(260, 12, 300, 32, "blocks.L.hook_resid_pre", "io", "hook")
arrow([(410, 44), (410, 62)])
a(f'<polyline class="ln" points="{RX},62 {MX},62"/>')
for x in (RX, AX, MX):
    a(f'<circle cx="{x}" cy="62" r="3" fill="#37474f"/>')
# flagged copies
box(AX - AW / 2, 80, AW, 36, "set_use_attn_in: blocks.L.hook_attn_in\nset_use_split_qkv_input: hook_q/k/v_input",
    "flag", "flagtext")
box(MX - MW / 2, 80, MW, 36, "set_use_hook_mlp_in:\nblocks.L.hook_mlp_in", "flag", "flagtext")
arrow([(AX, 62), (AX, 80)])
arrow([(MX, 62), (MX, 80)])

attn = [("ln1: LayerNorm\n(ln1.hook_scale, ln1.hook_normalized)", "ln1.hook_ln_out"),
        ("qkv: one fused linear,\nrows per head (q, k, v)", "attn.hook_q   attn.hook_k   attn.hook_v"),
        ("rotary on the first rotary_dim\nchannels of q and k", "attn.hook_rot_q   attn.hook_rot_k"),
        ("q·kᵀ / √d_head, −inf causal mask", "attn.hook_attn_scores"),
        ("softmax over keys (fp32)", "attn.hook_pattern"),
        ("pattern @ v", "attn.hook_z"),
        ("per head: z @ W_O[h]", "attn.hook_result   (built only when hooked)"),
        ("sum over heads, + b_O", "blocks.L.hook_attn_out")]
mlp = [("ln2: LayerNorm\n(ln2.hook_scale, ln2.hook_normalized)", "ln2.hook_ln_out"),
       ("W_in, + b_in", "mlp.hook_pre"),
       ("GELU", "mlp.hook_post"),
       ("W_out, + b_out", "blocks.L.hook_mlp_out")]
TOP, STEP, BH = 150, 78, 38
arrow([(AX, 116), (AX, TOP)])
arrow([(MX, 116), (MX, TOP)])
for col, stages, w in ((AX, attn, AW), (MX, mlp, MW)):
    for i, (label, hk) in enumerate(stages):
        y = TOP + i * STEP
        box(col - w / 2, y, w, BH, label)
        if i + 1 < len(stages):
            arrow([(col, y + BH), (col, y + STEP)])
            hook(col + 8, y + BH + 25, hk)
    last_y = TOP + (len(stages) - 1) * STEP + BH
    stages_hook = stages[-1][1]
    SUM_Y = TOP + len(attn) * STEP + 10
    if col == AX:
        arrow([(col, last_y), (col, SUM_Y - 30), (410 - 13, SUM_Y - 11)])
        hook(col - 8, last_y + 20, stages_hook, anchor="end")
    else:
        arrow([(col, last_y), (col, SUM_Y - 40), (410 + 14, SUM_Y - 8)])
        hook(col + 8, last_y + 24, stages_hook)
# the residual path
SUM_Y = TOP + len(attn) * STEP + 10
arrow([(RX, 62), (RX, SUM_Y), (410 - 18, SUM_Y)])
a(f'<text class="note" transform="translate({RX - 10},{(62 + SUM_Y) / 2}) rotate(-90)" text-anchor="middle">'
  'resid_pre, unchanged: both branches read it (no resid_mid in a parallel block)</text>')
a(f'<circle cx="410" cy="{SUM_Y}" r="17" fill="white" stroke="#37474f" stroke-width="1.4"/>')
a(f'<text x="410" y="{SUM_Y + 6}" text-anchor="middle" font-size="20">+</text>')
arrow([(410, SUM_Y + 17), (410, SUM_Y + 40)])
box(230, SUM_Y + 40, 360, 32, "blocks.L.hook_resid_post", "io", "hook")
a(f'<text class="note" x="410" y="{SUM_Y + 92}" text-anchor="middle">resid_post = resid_pre + attn_out + mlp_out '
  '= blocks.(L+1).hook_resid_pre</text>')
a(f'<text class="note" x="410" y="{SUM_Y + 112}" text-anchor="middle">before block 0: hook_embed (no positional '
  'embedding: positions enter through rotary) · after the last: ln_final.* then hook_logits</text>')
a('</svg>')
open(sys.argv[1], "w").write("\n".join(out) + "\n")
