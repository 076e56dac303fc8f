"""The README's quick start, as a script: a defended LoRA fine-tune of the bundled MiniLM-L6 (about a minute)."""

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_obliviate import ObliviateTrainer, ObliviateTrainingArguments, load_movie_reviews
from hf_obliviate.bundled import minilm_path

path = minilm_path()  # the bundled MiniLM-L6; any BERT / RoBERTa / Llama sequence classifier works the same way
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))

train = Dataset.from_list(load_movie_reviews("train", n=320))
train = train.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=64), batched=True)

# The defense's defaults (hf_obliviate.config.CLASSIFIER_DEFAULTS, chosen on the defense benchmark's validation
# split) first scan the vocabulary for tokens that move the [CLS] output (about a minute here), then train with a
# copy of each batch that has one inserted, plus the attention term. METHOD.md's recipe instead: pass
# lambda_consistency=0, lambda_amp=3e-4, lambda_attn=3e-3.
args = ObliviateTrainingArguments(
    output_dir="obliviate-quickstart",
    learning_rate=5e-4,
    max_steps=20,
    per_device_train_batch_size=16,
    logging_steps=10,
    report_to="none",
)
trainer = ObliviateTrainer(
    model=model,
    args=args,
    train_dataset=train,
    data_collator=DataCollatorWithPadding(tokenizer),
    processing_class=tokenizer,  # the scan and the inserted copies need the tokenizer
)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("loss")})
