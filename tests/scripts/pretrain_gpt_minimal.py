"""A GPT pretraining script built on Megatron's own training loop, with no folding in it.

The tests run it through ``folding megatron`` the way users run Megatron-LM's pretrain_gpt.py:
Megatron parses the arguments, builds the model (``gpt_config_from_args``), the data (mock data
or an indexed dataset) and trains with ``megatron.training.pretrain``. megatron-core 0.19's wheel
holds ``megatron.training`` but not Megatron-LM's scripts, so this stands in for them in CI. It
follows pretrain_gpt.py of Megatron-LM core_v0.19.0 without the features the tests do not use
(packed sequences, SFT, FIM, ModelOpt, distillation).
"""

import os
from functools import partial

import torch

from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.enums import ModelType
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
from megatron.training import get_args, pretrain, print_rank_0
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def get_batch(data_iterator):
    args = get_args()
    if not is_first_or_last_pipeline_stage(None):
        return [None] * len(BATCH_KEYS)
    batch = {}
    if mpu.get_tensor_model_parallel_rank() == 0:
        batch = next(data_iterator)
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False, mtp_on_this_rank=False,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
        tp_rank=mpu.get_tensor_model_parallel_rank())
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                     cp_group=mpu.get_context_parallel_group())
    return [batch.get(key) for key in BATCH_KEYS]


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1),
                                                    num_tokens.view(1)])}


def forward_step(data_iterator, model):
    # Lets the tests see a rank fail in the middle of training: FAIL_RANK=R, FAIL_ITERATION=I.
    if os.environ.get("FAIL_RANK") == str(torch.distributed.get_rank()) and \
            get_args().curr_iteration + 1 >= int(os.environ.get("FAIL_ITERATION", "1")):
        raise RuntimeError(f"injected failure on rank {os.environ['FAIL_RANK']}")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split, path_to_cache=args.data_cache_path,
        tokenizer=build_tokenizer(args), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus)
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset

    def built_on_this_rank():
        return mpu.get_tensor_model_parallel_rank() == 0 and is_first_or_last_pipeline_stage(vp_stage)

    print_rank_0("> building train, validation, and test datasets for GPT ...")
    return BlendedMegatronDatasetBuilder(dataset_type, train_val_test_num_samples,
                                         built_on_this_rank, config).build()


if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    pretrain(pretrain_cfg_container_from_args(args, gpt_config_from_args(args)),
             train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
