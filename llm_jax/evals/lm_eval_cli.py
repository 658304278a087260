"""lm-evaluation-harness's command line, with the `llm_jax` model class registered.

lm-eval 0.4 finds model classes only in its own table (`lm_eval.models.MODEL_MAPPING`), so its
`lm_eval` command cannot see third-party classes. This entry point registers ours, then hands
the command line to lm-eval unchanged:

    python -m llm_jax.evals.lm_eval_cli run --model llm_jax \\
        --model_args hf_dir=/ckpt/SmolLM2-135M-Instruct,batch_size=16 \\
        --tasks my_task --include_path ./my_tasks --output_path results/
"""

from lm_eval import __main__ as lm_eval_main

from llm_jax.evals import lm_eval_model  # pylint: disable=unused-import  (registers llm_jax)


def main() -> None:
  lm_eval_main.cli_evaluate()


if __name__ == '__main__':
  main()
