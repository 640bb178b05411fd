"""Data: the task tokenizer, procedural task generators, prompt-dataset loading."""

from gmpo_megatron.data.dataset import DatasetError, PromptBatch, PromptDataset, PromptRow, load_prompt_dataset
from gmpo_megatron.data.tasks import (
    PARQUET_SCHEMA,
    TASKS,
    ArithmeticTask,
    CountdownTask,
    TaskExample,
    generate_task_examples,
    make_task,
    write_task_parquet,
)
from gmpo_megatron.data.tokenizer import TASK_VOCAB_SIZE, build_task_tokenizer

__all__ = [
    "PARQUET_SCHEMA",
    "TASKS",
    "TASK_VOCAB_SIZE",
    "ArithmeticTask",
    "CountdownTask",
    "DatasetError",
    "PromptBatch",
    "PromptDataset",
    "PromptRow",
    "TaskExample",
    "build_task_tokenizer",
    "generate_task_examples",
    "load_prompt_dataset",
    "make_task",
    "write_task_parquet",
]
