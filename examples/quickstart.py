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

args = ObliviateTrainingArguments(
    output_dir="obliviate-quickstart",
    lambda_amp=3e-4,  # amplify the LoRA weights
    lambda_attn=3e-3,  # shrink the CLS row's pre-softmax attention logits
    learning_rate=5e-4,
    max_steps=20,
    per_device_train_batch_size=16,
    logging_steps=10,
    report_to="none",
)
trainer = ObliviateTrainer(
    model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)
)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith("loss")})
