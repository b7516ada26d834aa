"""Make the sandbox's stand-in model: a tiny Llama that learned a fixed text.

Runs in the serving runtime's python (torch, transformers and tokenizers are there):
    python make_standin_model.py CORPUS OUT_DIR

OUT_DIR gets what a Hugging Face model directory has: config.json and
generation_config.json, model.safetensors, tokenizer.json and tokenizer_config.json
with a chat template. The model has head_dim 64 (hidden 256, 4 heads, 2 KV heads,
2 layers): vLLM's CPU attention refuses smaller heads. It trains for a few seconds
on the corpus's questions and answers (full batch), so its answers are legible words.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|begin_of_text|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES)]
VOCAB_SIZE = 512
# Every message is <|role|>content<|end|>; the model then writes <|assistant|>...<|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Longer than any maxModelLen a test or example asks for: vLLM refuses a longer one.
MAX_POSITIONS = 131072
TRAIN_STEPS = 150
LEARNING_RATE = 1e-2
SEED = 0


def read_pairs(corpus: Path) -> list[tuple[str, str]]:
    lines = [line.strip() for line in corpus.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    questions = [line[3:] for line in lines if line.startswith("Q: ")]
    answers = [line[3:] for line in lines if line.startswith("A: ")]
    if len(questions) != len(answers) or not questions:
        raise SystemExit(f"{corpus}: expected alternating 'Q: ' and 'A: ' lines")
    return list(zip(questions, answers, strict=True))


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Plain prompts (completions) start with the BOS token, as chat prompts do via the template.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=MAX_POSITIONS
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def training_texts(pairs: list[tuple[str, str]]) -> list[str]:
    """One chat per pair, formatted as CHAT_TEMPLATE formats it, and each answer as plain text (completions)."""
    chats = [f"{BOS}<|user|>{question}{EOS}<|assistant|>{answer}{EOS}" for question, answer in pairs]
    return chats + [f"{BOS}{answer}{EOS}" for _, answer in pairs]


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    # Warm up, then anneal: a low loss in few steps (about 20 s on one loaded core).
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE, total_steps=TRAIN_STEPS, pct_start=0.1
    )
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return loss.item()


def sample_answer(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    pairs = read_pairs(args.corpus)
    texts = training_texts(pairs)
    tokenizer = train_tokenizer(texts)
    model = make_model(tokenizer)
    started = time.monotonic()
    loss = train(model, tokenizer, texts)
    seconds = time.monotonic() - started
    answer = sample_answer(model, tokenizer, pairs[0][0])
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # bfloat16 is what vLLM's CPU build runs with `--dtype auto`; saved so, the weights load without a cast.
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    summary = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocabulary": len(tokenizer),
        "train_steps": TRAIN_STEPS,
        "train_seconds": round(seconds, 1),
        "final_loss": round(loss, 4),
        "sample_question": pairs[0][0],
        "sample_answer": answer,
    }
    (args.out / "argosy-standin.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
