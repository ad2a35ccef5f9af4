//! The Llama forward pass: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.
//!
//! Activations live in plain row-major host buffers (`[tokens, width]`) and every reduction goes through
//! [`crate::kernels`], whose results do not depend on how many tokens share a pass.

use crate::attention::{attend_rows, KvElem, KvLayout, QueryRows};
use crate::cache::{put_rows, KvCache, KvPrecision, LayerKv};
use crate::config::{LlamaConfig, RopeStyle};
use crate::greedy_head::GreedyHead;
use crate::kernels;
use crate::linear::{Batching, Linear, Weights};
use crate::qkernels::IntActivations;
use crate::screen::ScreenedHead;
use crate::silu;
use crate::ModelError;

/// One transformer block. Q, K and V are fused into `wqkv`, gate and up into `w_gate_up`.
#[derive(Clone)]
pub struct Block {
    pub attn_norm: Vec<f32>,
    pub wqkv: Linear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    pub w_gate_up: Linear,
    pub w_down: Linear,
}

impl Block {
    /// The block's four matrices, in forward order.
    fn matrices(&self) -> [&Linear; 4] {
        [&self.wqkv, &self.wo, &self.w_gate_up, &self.w_down]
    }

    fn matrices_mut(&mut self) -> [&mut Linear; 4] {
        [
            &mut self.wqkv,
            &mut self.wo,
            &mut self.w_gate_up,
            &mut self.w_down,
        ]
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    /// `[vocab, hidden]`; row lookups give the input embeddings.
    pub embed: Linear,
    pub blocks: Vec<Block>,
    pub norm: Vec<f32>,
    /// `[vocab, hidden]`; often the same storage as `embed` (tied embeddings).
    pub lm_head: Linear,
    /// [`Batching::Invariant`] unless this model only drafts (see [`Batching`]).
    pub batching: Batching,
    /// What [`Self::new_cache`]'s caches store: f32 unless this model only drafts.
    pub kv_precision: KvPrecision,
    /// The integer kernels' activations in [`Self::prefill_bulk`]; `None`: those of every other
    /// forward. Only a draft sets it: the verify model's bits decide the output.
    pub bulk_acts: Option<IntActivations>,
    /// What [`Self::set_int_activations`] last set.
    int_acts: IntActivations,
    inv_freq: Vec<f32>,
    /// How `lm_head` is used: whole, restricted or screened (at most one of these).
    head: Head,
    /// The whole head's greedy tokens without all its logits ([`Self::forward_greedy`]); `None`
    /// where the head is not q8_0 or the CPU has no SIMD integer kernels.
    greedy: Option<GreedyHead>,
}

/// How a model computes its logits from `lm_head`.
enum Head {
    Whole,
    /// `lm_head` holds only these token ids' rows ([`Llama::restrict_head`]).
    Restricted(Vec<u32>),
    /// A coarse copy of `lm_head` picks the rows it computes ([`Llama::screen_head`]).
    Screened(ScreenedHead),
}

/// Which positions of a forward pass need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every new position: verification compares each one with the draft.
    All,
    /// Only the last: prefill and drafting need just the next token.
    Last,
    /// Rows `i..`: verification after catching up on committed tokens.
    From(usize),
}

impl LogitsFor {
    /// The first of `m` rows whose logits are asked for (`From` past the end: the last).
    fn first(self, m: usize) -> usize {
        match self {
            Self::All => 0,
            Self::Last => m - 1,
            Self::From(i) => i.min(m - 1),
        }
    }
}

/// Logits of one forward pass, `rows x vocab`, row-major.
pub struct Logits {
    pub data: Vec<f32>,
    pub rows: usize,
    pub vocab: usize,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The greedy token of every row.
    pub fn argmax(&self) -> Vec<u32> {
        (0..self.rows)
            .map(|i| kernels::argmax(self.row(i)))
            .collect()
    }
}

impl Llama {
    pub fn new(
        config: LlamaConfig,
        embed: Linear,
        blocks: Vec<Block>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let (h, q, kv, ff) = (
            config.hidden_size,
            config.q_dim(),
            config.kv_dim(),
            config.intermediate_size,
        );
        let check = |what: &str, l: &Linear, out: usize, inp: usize| {
            if l.out_features() != out || l.in_features() != inp {
                return Err(ModelError::Shape(format!(
                    "{what} is {}x{}, the config says {out}x{inp}",
                    l.out_features(),
                    l.in_features()
                )));
            }
            Ok(())
        };
        check("token embedding", &embed, config.vocab_size, h)?;
        check("output head", &lm_head, config.vocab_size, h)?;
        if norm.len() != h || blocks.len() != config.n_layers {
            return Err(ModelError::Shape(format!(
                "{} blocks and a {}-wide final norm for {} layers of width {h}",
                blocks.len(),
                norm.len(),
                config.n_layers
            )));
        }
        for (i, b) in blocks.iter().enumerate() {
            check(&format!("block {i} qkv"), &b.wqkv, q + 2 * kv, h)?;
            check(&format!("block {i} attention output"), &b.wo, h, q)?;
            check(&format!("block {i} gate/up"), &b.w_gate_up, 2 * ff, h)?;
            check(&format!("block {i} down"), &b.w_down, h, ff)?;
            if b.attn_norm.len() != h || b.ffn_norm.len() != h {
                return Err(ModelError::Shape(format!(
                    "block {i} norms are not {h} wide"
                )));
            }
        }
        let inv_freq = config.rope_inv_freq();
        let greedy = GreedyHead::new(&lm_head)?;
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            lm_head,
            batching: Batching::Invariant,
            inv_freq,
            head: Head::Whole,
            greedy,
            kv_precision: KvPrecision::F32,
            bulk_acts: None,
            int_acts: IntActivations::default(),
        })
    }

    /// Restricts the output head to the token ids `keep` (increasing; see [`crate::ranking`]): a
    /// draft model that reads fewer bytes per token. The other tokens get logit -inf, so neither
    /// greedy nor sampled choice proposes them; the embedding stays whole, so the model still reads
    /// any token. Keeping every id is a no-op. Never for a verify model: its logits decide the
    /// output.
    pub fn restrict_head(&mut self, keep: &[u32]) -> Result<(), ModelError> {
        let vocab = self.config.vocab_size;
        if keep.len() >= vocab {
            return Ok(());
        }
        self.check_head_whole()?;
        if !keep.windows(2).all(|w| w[0] < w[1]) {
            return Err(ModelError::Shape("head ids must increase".into()));
        }
        self.lm_head = self.lm_head.select_rows(keep)?;
        self.head = Head::Restricted(keep.to_vec());
        self.greedy = None;
        Ok(())
    }

    /// Screens the output head ([`crate::screen`]): a q4_0 copy ranks the vocabulary and only
    /// each row's `keep` best candidates are scored by the head as stored. A draft model's head
    /// then reads about half the bytes; never for a verify model, whose logits decide the output.
    pub fn screen_head(&mut self, keep: usize) -> Result<(), ModelError> {
        self.check_head_whole()?;
        self.head = Head::Screened(ScreenedHead::new(&self.lm_head, keep)?);
        self.greedy = None;
        Ok(())
    }

    /// How the integer kernels take activations ([`IntActivations`]) in every block and the
    /// output head (a screened head's coarse copy keeps 8 bits: it only ranks candidates).
    pub fn set_int_activations(&mut self, acts: IntActivations) {
        for l in self.blocks.iter_mut().flat_map(Block::matrices_mut) {
            l.set_int_activations(acts);
        }
        self.lm_head.set_int_activations(acts);
        self.int_acts = acts;
    }

    /// What [`Self::set_int_activations`] last set (8 bits until then).
    pub fn int_activations(&self) -> IntActivations {
        self.int_acts
    }

    /// Runs `tokens` at positions `start_pos..` into `cache` alone, as the bulk of a prompt: the
    /// positions before the last few a draft model predicts from, which it may compute more
    /// cheaply (with [`Self::bulk_acts`]). Why: on a CPU without VNNI, a draft's 16-bit
    /// activations make its prefill slower than the f32 verify model's, so the draft starts
    /// behind it; 8 bits there and 16 for the prompt's tail kept most of 16 bits' agreement
    /// (README, *A prompt's bulk at 8 bits*).
    pub fn prefill_bulk(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
    ) -> Result<(), ModelError> {
        let own = self.int_acts;
        let bulk = self.bulk_acts.unwrap_or(own);
        self.set_int_activations(bulk);
        let done = self.forward(tokens, start_pos, cache, LogitsFor::Last);
        self.set_int_activations(own);
        done.map(drop)
    }

    /// Runs `tokens` at positions `start_pos..` into `cache` alone (no logits), calling `hook`
    /// before each block attends and after each block: one side of a prefill split between two
    /// processes. One computes the prompt's first positions and hands each block's keys and
    /// values over as they come ([`BlockHook::after_block`]); the other computes the rest from
    /// `start_pos` on, taking each block's earlier keys and values in just before that block
    /// attends ([`BlockHook::before_attention`] and [`KvCache::write_positions`], after
    /// [`KvCache::cover`]). Every position's result depends only on the positions before it, not
    /// on the batch, so the two halves have the bits of one whole prefill (tested). Returns
    /// whether the pass ran to its end, when the cache keeps `start_pos + tokens.len()` positions;
    /// a hook that ends it early (`Break`) leaves the cache at `start_pos`.
    pub fn prefill_hooked(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
        hook: &mut dyn BlockHook,
    ) -> Result<bool, ModelError> {
        let x = self.run_blocks_hooked(tokens, start_pos, cache, LogitsFor::Last, hook);
        if !matches!(x, Ok(Some(_))) {
            cache.truncate(start_pos);
        }
        Ok(x?.is_some())
    }

    /// This model's matrices, shared, in the verify model's arithmetic
    /// ([`Batching::VerifyArithmetic`], an f32 cache): for a draft that holds a checkpoint's own
    /// blocks (`PATH:stored`), a model whose keys and values are those of the verify model
    /// `PATH:f32` bit for bit (tested), without a second copy of the weights. Only its
    /// [`Self::prefill_hooked`] is meant: its head is the draft's. `None` where a matrix cannot
    /// give the checkpoint's f32 values (candle's k-quants, a k-quant taken as q4_1).
    pub fn verify_twin(&self) -> Option<Llama> {
        let exact = |l: &Linear| match l.weights() {
            Weights::Int(w) => w.widens_exactly(),
            Weights::Quantized(_) => false,
            _ => true,
        };
        if !self.layer_matrices().all(exact) || !exact(&self.embed) {
            return None;
        }
        Some(Llama {
            config: self.config.clone(),
            embed: self.embed.clone(),
            blocks: self.blocks.clone(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            batching: Batching::VerifyArithmetic,
            kv_precision: KvPrecision::F32,
            bulk_acts: None,
            int_acts: self.int_acts,
            inv_freq: self.inv_freq.clone(),
            head: Head::Whole,
            greedy: None,
        })
    }

    /// The head can be restricted or screened once, and not both.
    fn check_head_whole(&self) -> Result<(), ModelError> {
        match self.head {
            Head::Whole => Ok(()),
            _ => Err(ModelError::Shape(
                "the output head is already restricted or screened".into(),
            )),
        }
    }

    /// Every block's matrices, block by block.
    fn layer_matrices(&self) -> impl Iterator<Item = &Linear> {
        self.blocks.iter().flat_map(Block::matrices)
    }

    /// Collapses the memory of every weight matrix into transparent huge pages where the OS can
    /// ([`crate::hugepages`]); returns how many 2 MiB regions it collapsed.
    pub fn collapse_to_huge_pages(&self) -> usize {
        let layers = self.layer_matrices();
        let screen = match &self.head {
            Head::Screened(screen) => Some(screen.coarse()),
            _ => None,
        };
        let all = layers.chain([&self.embed, &self.lm_head]).chain(screen);
        let greedy = self.greedy.as_ref().map(GreedyHead::span);
        crate::hugepages::collapse(all.filter_map(Linear::span).chain(greedy))
    }

    /// The matrices one forward multiplies by: bytes read and multiply-adds per token.
    pub fn matmul_cost(&self) -> (usize, usize) {
        let layers = self.layer_matrices();
        let (bytes, macs) = layers.fold((0, 0), |(bytes, macs), l| {
            (bytes + l.bytes(), macs + l.in_features() * l.out_features())
        });
        let head = match &self.head {
            Head::Screened(screen) => screen.cost(&self.lm_head),
            _ => (
                self.lm_head.bytes(),
                self.lm_head.in_features() * self.lm_head.out_features(),
            ),
        };
        (bytes + head.0, macs + head.1)
    }

    /// A fresh cache able to hold `capacity` positions (capped at the model's context).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let capacity = capacity.min(self.config.max_position);
        KvCache::new(&self.config, capacity, self.kv_precision)
    }

    /// Runs `tokens` at positions `start_pos..`, after forgetting whatever `cache` held from
    /// `start_pos` on (so a forward at an earlier position is a rollback), and returns the logits that
    /// predict the token after each requested position.
    pub fn forward(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
        which: LogitsFor,
    ) -> Result<Logits, ModelError> {
        let x = self.run_blocks(tokens, start_pos, cache, which)?;
        self.logits(&x, tokens.len(), which)
    }

    /// [`Self::forward`]'s greedy tokens, `kernels::argmax` of each requested row's logits,
    /// computed without all the logits where the head allows ([`crate::greedy_head`]).
    pub fn forward_greedy(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
        which: LogitsFor,
    ) -> Result<Vec<u32>, ModelError> {
        let x = self.run_blocks(tokens, start_pos, cache, which)?;
        let m = tokens.len();
        match (&self.head, &self.greedy) {
            (Head::Whole, Some(greedy)) => {
                let first = which.first(m);
                let hidden = self.final_norm(&x, first);
                greedy.argmax(&self.lm_head, &hidden, m - first)
            }
            _ => Ok(self.logits(&x, m, which)?.argmax()),
        }
    }

    /// Whether [`Self::forward_greedy`] screens the head where it can (for a comparison: it
    /// changes no token).
    pub fn set_greedy_screen(&mut self, on: bool) -> Result<(), ModelError> {
        self.greedy = match (on, &self.head) {
            (true, Head::Whole) => GreedyHead::new(&self.lm_head)?,
            _ => None,
        };
        Ok(())
    }

    /// The blocks of [`Self::forward`]: the last block's output `x`, `tokens.len()` rows.
    fn run_blocks(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
        which: LogitsFor,
    ) -> Result<Vec<f32>, ModelError> {
        let x = self.run_blocks_hooked(tokens, start_pos, cache, which, &mut NoHook)?;
        Ok(x.expect("a pass without a hook runs to its end"))
    }

    /// [`Self::run_blocks`] calling `hook` around each block; `None` if the hook ended the pass.
    fn run_blocks_hooked(
        &self,
        tokens: &[u32],
        start_pos: usize,
        cache: &mut KvCache,
        which: LogitsFor,
        hook: &mut dyn BlockHook,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        let cfg = &self.config;
        let m = tokens.len();
        if m == 0 {
            return Err(ModelError::Shape("forward over zero tokens".into()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ModelError::Shape(format!(
                "token id {t} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        cache.check_room(start_pos, m)?;
        cache.truncate(start_pos);

        debug_assert_eq!(cache.kv_dim(), cfg.kv_dim());
        let mut x = self.embed_tokens(tokens)?;
        let mut s = Scratch::new(cfg, m);
        let rope = self.rope_table(start_pos, m);
        let layout = cache.layout();
        let last = self.blocks.len().saturating_sub(1);
        for (layer, block) in self.blocks.iter().enumerate() {
            if hook.before_attention(layer, cache)?.is_break() {
                return Ok(None);
            }
            let kv = CacheLayer {
                kv: cache.layer_mut(layer),
                layout,
                start_pos,
            };
            // The last block's output feeds only the logits: the rows before the first one asked
            // for need its keys and values, not its attention output or MLP (a prefill's last
            // block is 97% of those rows' work; each row's result is its own, so no bit moves).
            let from = if layer == last { which.first(m) } else { 0 };
            self.attention(block, kv, &rope, &mut x, &mut s, from)?;
            self.feed_forward(block, &mut x, &mut s, from)?;
            if hook.after_block(layer, cache)?.is_break() {
                return Ok(None);
            }
        }
        cache.set_len(start_pos + m);
        Ok(Some(x))
    }

    /// `x += attention(rms_norm(x))` for one block: Q, K and V, rotary embeddings, the new keys
    /// and values into the cache, each row from `from` on attending causally, the output
    /// projection (rows before `from` only store their keys and values).
    fn attention(
        &self,
        block: &Block,
        kv: CacheLayer<'_>,
        rope: &RopeTable,
        x: &mut [f32],
        s: &mut Scratch,
        from: usize,
    ) -> Result<(), ModelError> {
        let cfg = &self.config;
        let (q_dim, kv_dim, m) = (cfg.q_dim(), cfg.kv_dim(), s.rows);
        let qkv_dim = q_dim + 2 * kv_dim;
        s.normed.copy_from_slice(x);
        kernels::rms_norm(&mut s.normed, &block.attn_norm, cfg.rms_eps);
        block
            .wqkv
            .forward(&s.normed, m, &mut s.qkv, self.batching)?;
        let mut kv = kv;
        for (i, row) in s.qkv.chunks_exact_mut(qkv_dim).enumerate() {
            let (q, rest) = row.split_at_mut(q_dim);
            let (k, v) = rest.split_at_mut(kv_dim);
            let (cos, sin) = rope.at(i);
            for head in q
                .chunks_exact_mut(cfg.head_dim)
                .chain(k.chunks_exact_mut(cfg.head_dim))
            {
                apply_rope(head, cos, sin, cfg.rope_style);
            }
            kv.put(i, k, v, cfg.head_dim);
        }
        let (r, h) = (m - from, cfg.hidden_size);
        let rows = QueryRows {
            q: &s.qkv[from * qkv_dim..],
            stride: qkv_dim,
            rows: r,
            first_pos: kv.start_pos + from,
        };
        let heads = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let (scores, out) = (&mut s.scores, &mut s.attn[..r * q_dim]);
        match kv.kv {
            LayerKv::F32(k, v) => attend_layer(rows, k, v, kv.layout, heads, scores, out),
            LayerKv::F16(k, v) => attend_layer(rows, k, v, kv.layout, heads, scores, out),
        }
        let proj = &mut s.proj[..r * h];
        block
            .wo
            .forward(&s.attn[..r * q_dim], r, proj, self.batching)?;
        add_in_place(&mut x[from * h..], proj);
        Ok(())
    }

    /// `x += down(silu(gate(rms_norm(x))) * up(rms_norm(x)))` for one block's rows from `from` on.
    fn feed_forward(
        &self,
        block: &Block,
        x: &mut [f32],
        s: &mut Scratch,
        from: usize,
    ) -> Result<(), ModelError> {
        let (ff, h) = (self.config.intermediate_size, self.config.hidden_size);
        let r = s.rows - from;
        let (x, normed) = (&mut x[from * h..], &mut s.normed[..r * h]);
        normed.copy_from_slice(x);
        kernels::rms_norm(normed, &block.ffn_norm, self.config.rms_eps);
        let (gate_up, act) = (&mut s.gate_up[..r * 2 * ff], &mut s.act[..r * ff]);
        block.w_gate_up.forward(normed, r, gate_up, self.batching)?;
        for (row, a) in gate_up.chunks_exact(2 * ff).zip(act.chunks_exact_mut(ff)) {
            a.copy_from_slice(&row[..ff]);
            silu::silu_mul(a, &row[ff..]);
        }
        let proj = &mut s.proj[..r * h];
        block.w_down.forward(act, r, proj, self.batching)?;
        add_in_place(x, proj);
        Ok(())
    }

    /// The logits of the rows `which` asks for, from the last block's output `x` (`m` rows); ids
    /// beyond a restricted head ([`Self::restrict_head`]) get -inf.
    fn logits(&self, x: &[f32], m: usize, which: LogitsFor) -> Result<Logits, ModelError> {
        let vocab = self.config.vocab_size;
        let first = which.first(m);
        let rows = m - first;
        let hidden = self.final_norm(x, first);
        let mut data = vec![f32::NEG_INFINITY; rows * vocab];
        match &self.head {
            Head::Screened(screen) => {
                screen.forward(&self.lm_head, &hidden, rows, &mut data, self.batching)?
            }
            Head::Whole => self
                .lm_head
                .forward(&hidden, rows, &mut data, self.batching)?,
            Head::Restricted(ids) => {
                let mut part = vec![0f32; rows * ids.len()];
                self.lm_head
                    .forward(&hidden, rows, &mut part, self.batching)?;
                for (out, row) in data
                    .chunks_exact_mut(vocab)
                    .zip(part.chunks_exact(ids.len()))
                {
                    for (&id, &v) in ids.iter().zip(row) {
                        out[id as usize] = v;
                    }
                }
            }
        }
        Ok(Logits { data, rows, vocab })
    }

    /// The last block's output `x` from row `first` on, normalized for the head.
    fn final_norm(&self, x: &[f32], first: usize) -> Vec<f32> {
        let mut hidden = x[first * self.config.hidden_size..].to_vec();
        kernels::rms_norm(&mut hidden, &self.norm, self.config.rms_eps);
        hidden
    }

    fn embed_tokens(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut x = vec![0f32; tokens.len() * self.config.hidden_size];
        self.embed.rows_into(tokens, &mut x)?;
        Ok(x)
    }

    fn rope_table(&self, start_pos: usize, m: usize) -> RopeTable {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(m * half);
        let mut sin = Vec::with_capacity(m * half);
        for i in 0..m {
            let pos = (start_pos + i) as f32;
            for &f in &self.inv_freq {
                let (s, c) = (pos * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        RopeTable { cos, sin, half }
    }
}

/// Cosines and sines of the rotation angles of each position in a pass, `[position][pair]`.
/// What a hooked prefill ([`Llama::prefill_hooked`]) does around each block.
pub trait BlockHook {
    /// Before block `layer` attends (its new keys and values not yet stored): the positions
    /// before the pass's first must hold this block's keys and values when this returns
    /// `Continue`; `Break` ends the pass.
    fn before_attention(
        &mut self,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<std::ops::ControlFlow<()>, ModelError>;
    /// After block `layer`, whose keys and values of the pass's positions are in `cache`:
    /// `Break` ends the pass there.
    fn after_block(
        &mut self,
        layer: usize,
        cache: &KvCache,
    ) -> Result<std::ops::ControlFlow<()>, ModelError>;
}

/// The hook of a plain forward: does nothing.
struct NoHook;

impl BlockHook for NoHook {
    fn before_attention(
        &mut self,
        _: usize,
        _: &mut KvCache,
    ) -> Result<std::ops::ControlFlow<()>, ModelError> {
        Ok(std::ops::ControlFlow::Continue(()))
    }
    fn after_block(
        &mut self,
        _: usize,
        _: &KvCache,
    ) -> Result<std::ops::ControlFlow<()>, ModelError> {
        Ok(std::ops::ControlFlow::Continue(()))
    }
}

/// One layer of the KV cache and where this forward's rows start in it.
struct CacheLayer<'a> {
    kv: LayerKv<'a>,
    layout: KvLayout,
    start_pos: usize,
}

impl CacheLayer<'_> {
    /// Stores row `i`'s keys `k` and values `v` (`n_kv_heads` heads of `hd`) at its position.
    fn put(&mut self, i: usize, k: &[f32], v: &[f32], hd: usize) {
        let (layout, pos) = (self.layout, self.start_pos + i);
        match &mut self.kv {
            LayerKv::F32(keys, values) => put_rows(layout, pos, (keys, values), (k, v), hd),
            LayerKv::F16(keys, values) => put_rows(layout, pos, (keys, values), (k, v), hd),
        }
    }
}

/// A forward pass's activation buffers, `rows` tokens wide, reused by every block.
struct Scratch {
    rows: usize,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    fn new(cfg: &LlamaConfig, m: usize) -> Self {
        let (h, q, kv, ff) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        Self {
            rows: m,
            normed: vec![0.0; m * h],
            qkv: vec![0.0; m * (q + 2 * kv)],
            attn: vec![0.0; m * q],
            proj: vec![0.0; m * h],
            gate_up: vec![0.0; m * 2 * ff],
            act: vec![0.0; m * ff],
            scores: Vec::new(),
        }
    }
}

struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RopeTable {
    fn at(&self, i: usize) -> (&[f32], &[f32]) {
        let r = i * self.half..(i + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }
}

/// [`attend_rows`] over one layer's cache, with the model's `(n_heads, n_kv_heads, head_dim)`.
fn attend_layer<T: KvElem>(
    rows: QueryRows<'_>,
    keys: &[T],
    values: &[T],
    layout: KvLayout,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_rows(
        rows, keys, values, layout, n_heads, n_kv_heads, head_dim, scores, out,
    );
}

fn apply_rope(head: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = head.len() / 2;
    for p in 0..half {
        let (a, b) = match style {
            RopeStyle::Interleaved => (2 * p, 2 * p + 1),
            RopeStyle::Halves => (p, p + half),
        };
        let (x0, x1) = (head[a], head[b]);
        head[a] = x0 * cos[p] - x1 * sin[p];
        head[b] = x0 * sin[p] + x1 * cos[p];
    }
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::linear::WeightFormat;
    use crate::testing::TinyModel;
    use candle_core::quantized::GgmlDType;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn tiny_paths() -> &'static (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        static DIR: OnceLock<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> =
            OnceLock::new();
        DIR.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let tiny = TinyModel::default();
            let hf = dir.path().join("hf");
            tiny.write_hf(&hf).unwrap();
            let gguf = dir.path().join("tiny.gguf");
            tiny.write_gguf(&gguf, GgmlDType::F32).unwrap();
            (dir, hf, gguf)
        })
    }

    fn gguf_model(format: WeightFormat) -> Llama {
        GgufFile::open(&tiny_paths().2)
            .unwrap()
            .load_llama(format)
            .unwrap()
    }

    /// The block types the verify model widens in registers.
    const BLOCKED: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    /// The tiny model written as a GGUF of block type `BLOCKED[i]`.
    fn tiny_blocked(i: usize) -> std::path::PathBuf {
        tiny_paths()
            .0
            .path()
            .join(format!("tiny-{:?}.gguf", BLOCKED[i]))
    }

    fn blocked_model(i: usize, format: WeightFormat) -> Llama {
        static WRITTEN: OnceLock<()> = OnceLock::new();
        WRITTEN.get_or_init(|| {
            for (i, dtype) in BLOCKED.iter().enumerate() {
                TinyModel::default()
                    .write_gguf(&tiny_blocked(i), *dtype)
                    .unwrap();
            }
        });
        GgufFile::open(&tiny_blocked(i))
            .unwrap()
            .load_llama(format)
            .unwrap()
    }

    /// `f32` on a block-quantized file keeps the blocks and widens them in registers; its logits
    /// have the bits of the model dequantized to f32 at load.
    #[test]
    fn f32_over_stored_blocks_equals_f32_dense() {
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 259).collect();
        for (i, dtype) in BLOCKED.iter().enumerate() {
            let (a, b) = (
                blocked_model(i, WeightFormat::F32),
                blocked_model(i, WeightFormat::F32Dense),
            );
            assert!(a.lm_head.storage_name().starts_with("f32["), "{dtype:?}");
            assert_eq!(b.lm_head.storage_name(), "f32");
            let (mut ca, mut cb) = (a.new_cache(64), b.new_cache(64));
            let la = a.forward(&tokens, 0, &mut ca, LogitsFor::All).unwrap();
            let lb = b.forward(&tokens, 0, &mut cb, LogitsFor::All).unwrap();
            for r in 0..tokens.len() {
                assert_eq!(bits(&la, r), bits(&lb, r), "{dtype:?} row {r}");
            }
        }
    }

    /// Files that mix k-quants as llama.cpp's q4_k_m (q4_k, V and down in q6_k) and q2_k (q2_k,
    /// V and down in q3_k) do: `f32` keeps both types as stored (fusing Q and K with the V of
    /// another type as f32) and its logits have f32-dense's bits.
    #[test]
    fn f32_over_mixed_k_quants_equals_f32_dense() {
        for (most, six) in [
            (GgmlDType::Q4K, GgmlDType::Q6K),
            (GgmlDType::Q2K, GgmlDType::Q3K),
        ] {
            mixed_k_quants_equal_f32_dense(most, six);
        }
    }

    fn mixed_k_quants_equal_f32_dense(most: GgmlDType, other: GgmlDType) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny-k-mix.gguf");
        let tiny = TinyModel {
            hidden: 256,
            intermediate: 512,
            ..TinyModel::default()
        };
        let v_or_down = |name: &str| name.contains("attn_v") || name.contains("ffn_down");
        tiny.write_gguf_typed(&path, |name| match v_or_down(name) {
            true => other,
            false => most,
        })
        .unwrap();
        let load = |f| GgufFile::open(&path).unwrap().load_llama(f).unwrap();
        let (a, b) = (load(WeightFormat::F32), load(WeightFormat::F32Dense));
        let names = |l: &Llama| {
            let b = &l.blocks[0];
            [&b.w_down, &b.w_gate_up, &b.wo, &b.wqkv].map(|w| w.storage_name())
        };
        let stored = |t: GgmlDType| format!("f32[{}]", format!("{t:?}").to_lowercase());
        let want = [stored(other), stored(most), stored(most), "f32".into()];
        assert_eq!(names(&a), want);
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 259).collect();
        let (mut ca, mut cb) = (a.new_cache(64), b.new_cache(64));
        let la = a.forward(&tokens, 0, &mut ca, LogitsFor::All).unwrap();
        let lb = b.forward(&tokens, 0, &mut cb, LogitsFor::All).unwrap();
        for r in 0..tokens.len() {
            assert_eq!(bits(&la, r), bits(&lb, r), "{most:?} row {r}");
        }
        // As a draft, as stored: the fused parts of two types load too (as q8_0).
        let c = load(WeightFormat::AsStored);
        assert_eq!(names(&c)[3], "q8_0");
        let mut cc = c.new_cache(64);
        let lc = c.forward(&tokens, 0, &mut cc, LogitsFor::All).unwrap();
        assert!(lc.data.iter().all(|v| v.is_finite()));
    }

    /// Keys and values of every layer, as a split prefill's first half hands them over.
    struct Handover {
        rows: Vec<(Vec<f32>, Vec<f32>)>,
        n: usize,
        layers_before: Vec<usize>,
        /// Ends the pass before this block attends.
        stop_before: Option<usize>,
    }

    impl BlockHook for Handover {
        fn before_attention(
            &mut self,
            layer: usize,
            cache: &mut KvCache,
        ) -> Result<std::ops::ControlFlow<()>, ModelError> {
            // The other half takes layer `layer` in only now, and it must be there already.
            self.layers_before.push(layer);
            if let Some((k, v)) = self.rows.get(layer) {
                cache.write_positions(layer, 0, k, v);
            }
            Ok(match self.stop_before == Some(layer) {
                true => std::ops::ControlFlow::Break(()),
                false => std::ops::ControlFlow::Continue(()),
            })
        }
        fn after_block(
            &mut self,
            layer: usize,
            cache: &KvCache,
        ) -> Result<std::ops::ControlFlow<()>, ModelError> {
            let len = self.n * cache.kv_dim();
            let (mut k, mut v) = (vec![0.0; len], vec![0.0; len]);
            cache.read_positions(layer, 0, &mut k, &mut v);
            self.rows.push((k, v));
            Ok(std::ops::ControlFlow::Continue(()))
        }
    }

    /// A prefill split at `h`: `a` computes positions `..h` (in a cache of every block, or of
    /// one block that each block overwrites, as the split prefill's helper does) and hands each
    /// block's keys and values to `b`, which computes `h..` from them; `b`'s next logits have the
    /// bits of one whole prefill's, and its cache holds the same keys and values.
    fn split_matches_whole(a: &Llama, b: &Llama, tokens: &[u32], h: usize, one_block: bool) {
        let (m, layers) = (tokens.len(), a.blocks.len());
        let mut whole = b.new_cache(64);
        b.forward(&tokens[..m - 1], 0, &mut whole, LogitsFor::Last)
            .unwrap();
        let want = b
            .forward(&tokens[m - 1..], m - 1, &mut whole, LogitsFor::Last)
            .unwrap();
        let mut hand = Handover {
            rows: Vec::new(),
            n: h,
            layers_before: Vec::new(),
            stop_before: None,
        };
        let mut first = match one_block {
            true => KvCache::one_block(&a.config, 64, KvPrecision::F32),
            false => a.new_cache(64),
        };
        assert!(a
            .prefill_hooked(&tokens[..h], 0, &mut first, &mut hand)
            .unwrap());
        assert_eq!((hand.rows.len(), first.len()), (layers, h));
        hand.layers_before.clear();
        let mut second = b.new_cache(64);
        second.cover(h).unwrap();
        // A pass its hook ends keeps nothing of its positions.
        hand.stop_before = Some(1);
        assert!(!b
            .prefill_hooked(&tokens[h..m - 1], h, &mut second, &mut hand)
            .unwrap());
        assert_eq!(second.len(), h);
        (hand.stop_before, hand.layers_before) = (None, Vec::new());
        assert!(b
            .prefill_hooked(&tokens[h..m - 1], h, &mut second, &mut hand)
            .unwrap());
        assert_eq!(hand.layers_before, (0..layers).collect::<Vec<_>>());
        let got = b
            .forward(&tokens[m - 1..], m - 1, &mut second, LogitsFor::Last)
            .unwrap();
        assert_eq!(bits(&got, 0), bits(&want, 0), "split at {h} of {m}");
        let len = m * b.config.kv_dim();
        for layer in 0..layers {
            let read = |c: &KvCache| {
                let (mut k, mut v) = (vec![0.0; len], vec![0.0; len]);
                c.read_positions(layer, 0, &mut k, &mut v);
                [k, v].map(|x| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            };
            assert_eq!(read(&second), read(&whole), "layer {layer}, split at {h}");
        }
    }

    #[test]
    fn a_prefill_split_between_two_models_has_the_bits_of_one() {
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 259).collect();
        for i in 0..BLOCKED.len() {
            let (a, b) = (
                blocked_model(i, WeightFormat::F32),
                blocked_model(i, WeightFormat::F32),
            );
            for h in [1, 7, 20, 38] {
                split_matches_whole(&a, &b, &tokens, h, false);
                split_matches_whole(&a, &b, &tokens, h, true);
            }
        }
    }

    /// An f16 cache takes positions in at its own precision and gives them back widened.
    #[test]
    fn written_positions_read_back_at_the_cache_precision() {
        let m = gguf_model(WeightFormat::F32);
        let kv = m.config.kv_dim();
        let k: Vec<f32> = (0..3 * kv).map(|i| i as f32 * 0.3 - 7.0).collect();
        let v: Vec<f32> = k.iter().map(|x| -x * 1.7).collect();
        for precision in [KvPrecision::F32, KvPrecision::F16] {
            let mut c = KvCache::new(&m.config, 40, precision);
            // Positions 17..20 straddle a key tile of the f16 layout.
            c.write_positions(1, 17, &k, &v);
            let (mut k2, mut v2) = (vec![0.0; 3 * kv], vec![0.0; 3 * kv]);
            c.read_positions(1, 17, &mut k2, &mut v2);
            let round = |x: &[f32]| match precision {
                KvPrecision::F32 => x.to_vec(),
                KvPrecision::F16 => x.iter().map(|&f| half::f16::from_f32(f).to_f32()).collect(),
            };
            assert_eq!((k2, v2), (round(&k), round(&v)), "{precision}");
        }
    }

    /// The greedy tokens of a forward are its logits' argmax, the head screened or not, for
    /// every requested row.
    #[test]
    fn greedy_forwards_give_the_logits_argmax() {
        let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 11) % 259).collect();
        let mut model = blocked_model(4, WeightFormat::F32);
        let mut cache = model.new_cache(64);
        let want = model
            .forward(&tokens, 0, &mut cache, LogitsFor::From(3))
            .unwrap()
            .argmax();
        model.greedy = GreedyHead::for_any_cpu(&model.lm_head).unwrap();
        assert!(model.greedy.is_some(), "a q8_0 head is screened");
        let got = model.forward_greedy(&tokens, 0, &mut cache, LogitsFor::From(3));
        assert_eq!(got.unwrap(), want);
        // A head swapped in after the screen was built is not screened by it.
        let reversed: Vec<u32> = (0..model.config.vocab_size as u32).rev().collect();
        model.lm_head = model.lm_head.select_rows(&reversed).unwrap();
        let want_swapped = model
            .forward(&tokens, 0, &mut cache, LogitsFor::From(3))
            .unwrap()
            .argmax();
        assert_ne!(want_swapped, want, "the swap shows nothing");
        let got = model.forward_greedy(&tokens, 0, &mut cache, LogitsFor::From(3));
        assert_eq!(got.unwrap(), want_swapped);
        model.set_greedy_screen(false).unwrap();
        let got = model.forward_greedy(&tokens, 0, &mut cache, LogitsFor::From(3));
        assert_eq!(got.unwrap(), want_swapped);
    }

    fn bits(l: &Logits, row: usize) -> Vec<u32> {
        l.row(row).iter().map(|v| v.to_bits()).collect()
    }

    /// A prompt's bulk runs with the bulk's activations and leaves the model's own in place: the
    /// logits after it have the bits of a prefill at 8 bits followed by forwards at 16.
    #[test]
    fn a_bulk_prefill_runs_its_own_activations_and_restores_the_models() {
        let tokens: Vec<u32> = (0..24).map(|i| (i * 53 + 7) % 259).collect();
        let (bulk, rest) = tokens.split_at(16);
        let stored = || blocked_model(1, WeightFormat::AsStored);
        let mut a = stored();
        assert!(
            a.lm_head.storage_name().starts_with("q4_1"),
            "integer kernels"
        );
        a.set_int_activations(IntActivations::Bits16);
        a.bulk_acts = Some(IntActivations::Bits8);
        let mut ca = a.new_cache(64);
        a.prefill_bulk(bulk, 0, &mut ca).unwrap();
        assert_eq!(a.int_activations(), IntActivations::Bits16);
        let la = a.forward(rest, 16, &mut ca, LogitsFor::All).unwrap();
        let mut b = stored();
        let mut cb = b.new_cache(64);
        b.forward(bulk, 0, &mut cb, LogitsFor::Last).unwrap();
        b.set_int_activations(IntActivations::Bits16);
        let lb = b.forward(rest, 16, &mut cb, LogitsFor::All).unwrap();
        let mut cc = b.new_cache(64);
        b.forward(bulk, 0, &mut cc, LogitsFor::Last).unwrap();
        let lc = b.forward(rest, 16, &mut cc, LogitsFor::All).unwrap();
        for r in 0..rest.len() {
            assert_eq!(bits(&la, r), bits(&lb, r), "row {r}");
        }
        let all16 = (0..rest.len()).all(|r| bits(&la, r) == bits(&lc, r));
        assert!(
            !all16,
            "a bulk at 16 bits gives the same logits: the test shows nothing"
        );
    }

    /// The HF loader (rotate-half) and the GGUF loader (permuted Q/K, interleaved pairs) agree.
    #[test]
    fn hf_and_gguf_layouts_give_the_same_model() {
        let (hf, _) = crate::hf::load_llama(&tiny_paths().1, WeightFormat::AsStored).unwrap();
        let gg = gguf_model(WeightFormat::AsStored);
        let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 259).collect();
        let (mut c1, mut c2) = (hf.new_cache(64), gg.new_cache(64));
        let a = hf.forward(&tokens, 0, &mut c1, LogitsFor::All).unwrap();
        let b = gg.forward(&tokens, 0, &mut c2, LogitsFor::All).unwrap();
        let max_diff = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-3, "max |hf - gguf| = {max_diff}");
        assert_eq!(a.argmax(), b.argmax());
    }

    /// A restricted head gives the full head's logits for the ids it keeps and -inf for the rest;
    /// the model still reads every token.
    #[test]
    fn a_restricted_head_keeps_its_ids_exactly() {
        let full = gguf_model(WeightFormat::AsStored);
        let mut head = gguf_model(WeightFormat::AsStored);
        let vocab = full.config.vocab_size;
        let keep: Vec<u32> = (0..vocab as u32).filter(|i| i % 3 != 1).collect();
        head.restrict_head(&keep).unwrap();
        assert_eq!(head.lm_head.out_features(), keep.len());
        let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 200) % 259).collect();
        let (mut c1, mut c2) = (full.new_cache(32), head.new_cache(32));
        let a = full.forward(&tokens, 0, &mut c1, LogitsFor::All).unwrap();
        let b = head.forward(&tokens, 0, &mut c2, LogitsFor::All).unwrap();
        for r in 0..tokens.len() {
            for (id, (&va, &vb)) in a.row(r).iter().zip(b.row(r)).enumerate() {
                let want = if id % 3 != 1 { va } else { f32::NEG_INFINITY };
                assert_eq!(vb.to_bits(), want.to_bits(), "row {r} id {id}");
            }
        }
        let all: Vec<u32> = (0..vocab as u32).collect();
        head.restrict_head(&all).unwrap();
        assert_eq!(
            head.lm_head.out_features(),
            keep.len(),
            "keeping all is a no-op"
        );
        assert!(
            head.restrict_head(&keep[..10]).is_err(),
            "restricting twice"
        );
        let mut other = gguf_model(WeightFormat::AsStored);
        assert!(other.restrict_head(&[5, 3]).is_err(), "ids out of order");
    }

    /// A screened head gives each row's candidates the full head's logits bit for bit and the rest
    /// the coarse copy's; screening every id is the full head; a row's logits do not depend on
    /// the rows beside it.
    #[test]
    fn a_screened_head_scores_its_candidates_exactly() {
        let full = gguf_model(WeightFormat::AsStored);
        let vocab = full.config.vocab_size;
        let tokens: Vec<u32> = (0..12).map(|i| (i * 37 + 200) % 259).collect();
        let mut c = full.new_cache(32);
        let want = full.forward(&tokens, 0, &mut c, LogitsFor::All).unwrap();
        for keep in [4, vocab] {
            let mut screened = gguf_model(WeightFormat::AsStored);
            screened.screen_head(keep).unwrap();
            let mut c = screened.new_cache(32);
            let got = screened
                .forward(&tokens, 0, &mut c, LogitsFor::All)
                .unwrap();
            for r in 0..tokens.len() {
                let same = (bits(&got, r).iter().zip(bits(&want, r)))
                    .filter(|(a, b)| *a == b)
                    .count();
                assert!(same >= keep, "row {r}: {same} exact logits, {keep} kept");
                assert!(keep == vocab || same < vocab, "row {r}: no coarse logit");
                let mut alone = screened.new_cache(32);
                let one = screened
                    .forward(&tokens[..=r], 0, &mut alone, LogitsFor::Last)
                    .unwrap();
                assert_eq!(bits(&one, 0), bits(&got, r), "row {r} alone");
            }
            assert!(screened.screen_head(keep).is_err(), "screening twice");
            assert!(screened.restrict_head(&[1, 2]).is_err(), "and restricting");
        }
    }

    /// A cache grown between forwards ([`KvCache::reserve`]) holds what it held: the next logits
    /// are those of a cache that was large from the start, for either precision; and an f16 cache
    /// changes the logits only by its rounding.
    #[test]
    fn a_grown_cache_keeps_its_positions() {
        let tokens: Vec<u32> = (0..20).map(|i| (i * 37 + 11) % 259).collect();
        let mut rows = Vec::new();
        for kv in [KvPrecision::F32, KvPrecision::F16] {
            let mut m = gguf_model(WeightFormat::F32);
            m.kv_precision = kv;
            let (mut small, mut large) = (m.new_cache(12), m.new_cache(64));
            assert_eq!(small.precision(), kv);
            m.forward(&tokens[..12], 0, &mut small, LogitsFor::Last)
                .unwrap();
            small.reserve(64);
            let a = m
                .forward(&tokens[12..], 12, &mut small, LogitsFor::All)
                .unwrap();
            m.forward(&tokens[..12], 0, &mut large, LogitsFor::Last)
                .unwrap();
            let b = m
                .forward(&tokens[12..], 12, &mut large, LogitsFor::All)
                .unwrap();
            assert_eq!(a.data, b.data, "{kv}");
            rows.push(a);
        }
        let (f32_row, f16_row) = (rows[0].row(7), rows[1].row(7));
        assert_ne!(f32_row, f16_row, "f16 rounding changed nothing");
        let close = f32_row
            .iter()
            .zip(f16_row)
            .all(|(a, b)| (a - b).abs() < 0.05);
        assert!(
            close,
            "f16 rounding changed the logits by more than expected"
        );
    }

    #[test]
    fn refuses_overflow_and_bad_tokens() {
        let m = gguf_model(WeightFormat::F32);
        let mut c = m.new_cache(8);
        assert!(matches!(
            m.forward(&[1; 9], 0, &mut c, LogitsFor::Last),
            Err(ModelError::ContextOverflow { .. })
        ));
        assert!(m.forward(&[100_000], 0, &mut c, LogitsFor::Last).is_err());
        assert!(m.forward(&[1], 3, &mut c, LogitsFor::Last).is_err());
    }

    /// Batch invariance on the real model (f32, as the verify model runs): one-at-a-time logits
    /// equal k-token-batch logits bit for bit, after a rollback.
    #[test]
    fn real_model_batched_forward_is_bit_identical() {
        let path = crate::testing::require_default_model();
        let m = GgufFile::open(&path)
            .unwrap()
            .load_llama(WeightFormat::F32)
            .unwrap();
        let mut s = 0x1234_5678_u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 49152) as u32
        };
        for k in [1usize, 3, 5, 8, 12, 16, 33] {
            let prompt: Vec<u32> = (0..12).map(|_| next()).collect();
            let batch: Vec<u32> = (0..k).map(|_| next()).collect();
            let mut c1 = m.new_cache(64);
            m.forward(&prompt, 0, &mut c1, LogitsFor::Last).unwrap();
            let mut one = Vec::new();
            for (i, &t) in batch.iter().enumerate() {
                one.push(bits(
                    &m.forward(&[t], 12 + i, &mut c1, LogitsFor::All).unwrap(),
                    0,
                ));
            }
            let mut c2 = m.new_cache(64);
            m.forward(&prompt, 0, &mut c2, LogitsFor::Last).unwrap();
            m.forward(&[next(), next()], 12, &mut c2, LogitsFor::All)
                .unwrap();
            let l = m.forward(&batch, 12, &mut c2, LogitsFor::All).unwrap();
            for (i, row) in one.iter().enumerate() {
                assert_eq!(row, &bits(&l, i), "k {k} row {i}");
            }
        }
    }

    /// On the real checkpoint (q4_1 layers, q8_0 embedding), the verify model's f32 arithmetic
    /// over the stored blocks gives the logits of the model dequantized at load, bit for bit.
    #[test]
    fn real_model_f32_over_blocks_equals_f32_dense() {
        let path = crate::default_model_path();
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-assets.sh model",
            path.display()
        );
        let load = |f| GgufFile::open(&path).unwrap().load_llama(f).unwrap();
        let (a, b) = (load(WeightFormat::F32), load(WeightFormat::F32Dense));
        let prompt: Vec<u32> = (0..20).map(|i| (i * 7919) % 40000 + 100).collect();
        let (mut ca, mut cb) = (a.new_cache(64), b.new_cache(64));
        for (start, chunk) in [
            (0, &prompt[..12]),
            (12, &prompt[12..13]),
            (13, &prompt[13..]),
        ] {
            let la = a.forward(chunk, start, &mut ca, LogitsFor::All).unwrap();
            let lb = b.forward(chunk, start, &mut cb, LogitsFor::All).unwrap();
            for r in 0..chunk.len() {
                assert_eq!(bits(&la, r), bits(&lb, r), "position {}", start + r);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The logits at a position are bit-identical whether it was computed one token at a time or
        /// inside a k-token batch, after arbitrary rollbacks, for every weight storage.
        #[test]
        fn batched_forward_is_bit_identical_to_one_at_a_time(
            seed: u64, plen in 1usize..20, k in 1usize..33, rollback in 0usize..20, fmt in 0usize..10,
            kv16: bool,
        ) {
            let format = [
                WeightFormat::F32, WeightFormat::F16, WeightFormat::Bf16,
                WeightFormat::Quantized(GgmlDType::Q8_0), WeightFormat::Quantized(GgmlDType::Q4_1),
            ].get(fmt).copied().unwrap_or(WeightFormat::F32);
            // Indices past the list: f32 arithmetic over a file stored in a block type.
            let mut m = match fmt.checked_sub(5) {
                Some(i) => blocked_model(i, WeightFormat::F32),
                None => gguf_model(format),
            };
            if kv16 {
                m.kv_precision = KvPrecision::F16;
            }
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; (s % 259) as u32 };
            let prompt: Vec<u32> = (0..plen).map(|_| next()).collect();
            let batch: Vec<u32> = (0..k).map(|_| next()).collect();
            let junk: Vec<u32> = (0..5).map(|_| next()).collect();

            // Reference: everything one token at a time in a fresh cache.
            let mut c1 = m.new_cache(128);
            let mut reference = Vec::new();
            for (i, &t) in prompt.iter().chain(&batch).enumerate() {
                let l = m.forward(&[t], i, &mut c1, LogitsFor::All).unwrap();
                reference.push(bits(&l, 0));
            }

            // Batched, after writing and rolling back junk at a random point of the prompt.
            let mut c2 = m.new_cache(128);
            m.forward(&prompt, 0, &mut c2, LogitsFor::Last).unwrap();
            let back = rollback.min(plen - 1);
            m.forward(&junk, back + 1, &mut c2, LogitsFor::All).unwrap();
            let redo = &prompt[back + 1..];
            if !redo.is_empty() {
                m.forward(redo, back + 1, &mut c2, LogitsFor::Last).unwrap();
            }
            let l = m.forward(&batch, plen, &mut c2, LogitsFor::All).unwrap();
            for i in 0..k {
                prop_assert_eq!(&bits(&l, i), &reference[plen + i], "format {} row {}", format, i);
            }
            prop_assert_eq!(c2.len(), plen + k);

            // Asking for the last rows only (the last block skips the others' attention output
            // and MLP) gives those rows' bits, and keys and values the next forward reads alike.
            let from = k / 2;
            c2.truncate(plen);
            let l = m.forward(&batch, plen, &mut c2, LogitsFor::From(from)).unwrap();
            for i in from..k {
                prop_assert_eq!(&bits(&l, i - from), &reference[plen + i], "from {} row {}", from, i);
            }
            c2.truncate(plen + from);
            let l = m.forward(&batch[from..], plen + from, &mut c2, LogitsFor::All).unwrap();
            prop_assert_eq!(&bits(&l, 0), &reference[plen + from], "after a partial last block");
        }
    }
}
