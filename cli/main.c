/* tokenformer: train, evaluate, scale and inspect TokenFormer vision transformers.
 * Git-style subcommands; this file only dispatches and holds the help texts. */
#include "cli/commands.h"

#include "common/error.h"
#include "common/timer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    const char *name;
    int (*run)(int argc, char **argv); /* NULL: not in this build yet */
    const char *summary;
    const char *usage;
} cli_command;

static const cli_command commands[] = {
    {"train", cmd_train, "train a model from a YAML config on an ImageFolder tree",
     "usage: tokenformer train --config FILE.yaml [--data ROOT] [--out DIR] [--set section.key=value]...\n"
     "                         [--device auto|cpu|cuda] [--resume DIR] [--init-from FILE.safetensors]\n"
     "                         [--init-state FILE.safetensors] [--deterministic]\n"
     "\n"
     "Trains with the recipe of the config (DESIGN.md section 3), evaluates on the validation split,\n"
     "and writes DIR/model.safetensors, DIR/state.safetensors and DIR/metrics.jsonl.\n"
     "  --config FILE     YAML config (configs/*.yaml)\n"
     "  --data ROOT       ImageFolder root with ROOT/train and ROOT/val (overrides data.root)\n"
     "  --out DIR         run directory (default runs/<config name>)\n"
     "  --set K=V         override any config key, e.g. --set schedule.epochs=1\n"
     "  --device D        auto (GPU when present), cpu or cuda (overrides run.device)\n"
     "  --resume DIR      continue the run in DIR exactly where its last checkpoint stopped\n"
     "  --init-from FILE  start from these weights (a grown model) with a fresh schedule\n"
     "  --init-state FILE optimizer moments and EMA to start from (with --init-from)\n"},
    {"eval", cmd_eval, "top-1/top-5 of a checkpoint on a validation split",
     "usage: tokenformer eval --ckpt FILE.safetensors --data ROOT [--split val] [--ema] [--batch N]\n"
     "                        [--device auto|cpu|cuda] [--json OUT] [--crop-pct F] [--workers N] [--limit N]\n"
     "\n"
     "Top-1, top-5 and loss over a split through the eval transform (shorter side to\n"
     "int(img_size / crop_pct), bicubic; centre crop). The last line is \"top-1: NN.NN%\".\n"
     "  --ema          the EMA weights of the state.safetensors beside the checkpoint\n"
     "  --json OUT     also per-class accuracy and the confusion matrix\n"
     "  --crop-pct F   eval crop fraction (default: the checkpoint's, else 0.875)\n"
     "  --limit N      an evenly spread subset of N images (the trainer's data.val_limit rule)\n"},
    {"predict", cmd_predict, "classes and probabilities of single images",
     "usage: tokenformer predict --ckpt FILE.safetensors [--topk 5] [--json] [--device auto|cpu|cuda]\n"
     "                           [--crop-pct F] [--batch N] [--dump-input FILE.npy] [--dump-logits FILE.npy]\n"
     "                           IMAGE...\n"
     "\n"
     "Decodes each image by content (JPEG, PNG, ...), applies the checkpoint's eval transform (resize the\n"
     "shorter side to int(img_size / crop_pct), bicubic; centre crop img_size) and prints its top-k classes\n"
     "with softmax probabilities. An image that cannot be read is an error naming it.\n"
     "  --ckpt FILE          model checkpoint (model.safetensors of a run)\n"
     "  --topk K             classes listed per image (default 5)\n"
     "  --json               print a JSON array of {image, predictions: [{class, index, probability}]}\n"
     "  --device D           auto (GPU when present), cpu or cuda\n"
     "  --crop-pct F         eval crop fraction (default: the checkpoint's, else 0.875)\n"
     "  --batch N            images per forward pass (default 32)\n"
     "  --dump-input FILE    write the normalised input batch [N,3,S,S] as float32 .npy\n"
     "  --dump-logits FILE   write the logits [N,classes] as float32 .npy\n"},
    {"scale", cmd_scale, "grow a trained model by adding parameter tokens",
     "usage: tokenformer scale --ckpt FILE --out FILE (--attn-tokens N --ffn-tokens M | --factor F)\n"
     "                         [--state FILE --out-state FILE] [--key-init zero|random]\n"
     "                         [--norm fixed|current] [--seed S]\n"
     "\n"
     "Appends parameter tokens (key and value rows) to every Pattention: Q, K, V, O to N tokens, the\n"
     "FFN to M (DESIGN.md section 4). Sizes only grow. Continue with `tokenformer train --init-from\n"
     "FILE [--init-state FILE]`.\n"
     "  --ckpt FILE        the trained checkpoint (model.safetensors)\n"
     "  --out FILE         the grown checkpoint; its growth_history records this step\n"
     "  --attn-tokens N    new token count of Q, K, V and O; with --ffn-tokens M for the FFN\n"
     "  --factor F         multiply both counts by F (rounded)\n"
     "  --state FILE       the training state of that checkpoint (state.safetensors): AdamW moments\n"
     "                     of old rows carried, new rows 0; the EMA grown like the weights\n"
     "  --out-state FILE   where the grown state goes\n"
     "  --key-init K       zero (default): new keys 0; random: N(0, 0.02)\n"
     "  --norm N           fixed (default): n_norm kept; current: n_norm = the new token count\n"
     "  --seed S           seed of the new rows (default 0); each row has its own stream, so growing\n"
     "                     in two steps gives the same rows as growing once\n"
     "Zero keys with fixed n_norm keep the model's function exactly (the default); any other choice\n"
     "(the paper's runs use random and current) changes it.\n"},
    {"bench", cmd_bench, "measure training, inference or loader throughput",
     "usage: tokenformer bench train|infer --config FILE.yaml [--batch N] [--steps K] [--device D]\n"
     "       tokenformer bench loader --data DIR [--transform train|eval] [--workers N] [--batches K]\n"},
    {"inspect", cmd_inspect, "print a checkpoint's or a config's model and tensors",
     "usage: tokenformer inspect FILE.safetensors\n"
     "       tokenformer inspect --config FILE.yaml [--set section.key=value]...\n"
     "\n"
     "Prints the model config, every tensor (name, dtype, shape) and the parameter count.\n"},
    {"prepare", cmd_prepare, "write a dataset as an ImageFolder tree of JPEG files",
     "usage: tokenformer prepare fashion-mnist --out DIR [--source DIR]\n"
     "       tokenformer prepare imagenet-like --out DIR --count N\n"
     "\n"
     "fashion-mnist: reads Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) and\n"
     "writes DIR/train/<class>/*.jpg (60000) and DIR/val/<class>/*.jpg (10000).\n"},
    {"plot", cmd_plot, "draw loss, learning rate and accuracy curves of a run",
     "usage: tokenformer plot RUN_DIR [--out FILE.png]\n"
     "       tokenformer plot --compare RUN_A RUN_B ... [--out FILE.png]\n"
     "\n"
     "Reads RUN_DIR/metrics.jsonl and draws three panels against the epoch: training and validation\n"
     "loss, learning rate, and top-1/top-5 accuracy (of the EMA weights too when the run kept them),\n"
     "with gnuplot (`apt-get install gnuplot-nox`).\n"
     "  --out FILE    the PNG (default RUN_DIR/curves.png; with --compare, compare.png)\n"
     "  --compare     several runs on the same axes, one colour each, named in the legend\n"},
};
enum { command_count = sizeof commands / sizeof commands[0] };

static const cli_command *find_command(const char *name) {
    for (int i = 0; i < command_count; i++)
        if (strcmp(commands[i].name, name) == 0) return &commands[i];
    return NULL;
}

int cli_print_help(const char *name) {
    if (name) {
        const cli_command *command = find_command(name);
        if (!command) return 1;
        fputs(command->usage, stdout);
        return 0;
    }
    printf("usage: tokenformer COMMAND [options]\n\n"
           "TokenFormer vision transformers: every projection is attention over parameter tokens.\n\n"
           "commands:\n");
    for (int i = 0; i < command_count; i++) printf("  %-8s %s\n", commands[i].name, commands[i].summary);
    printf("\n'tokenformer help COMMAND' shows a command's options.\n");
    return 0;
}

/* The CPU backend's kernels and OpenBLAS share libgomp's thread team, and libgomp by default spins
 * at every barrier before it sleeps. With more busy threads than cores (the loader's workers beside
 * the compute threads, or any other process) a spinning thread holds a core that the thread it
 * waits for needs: measured on 2 cores, CPU training ran at 95 img/s spinning and 320 img/s with
 * passive waits, and the GPU path does not use OpenMP at all. libgomp reads OMP_WAIT_POLICY only
 * when it is loaded, so the process restarts itself once with the variable set, unless the user
 * chose a policy. If the restart fails, it carries on with the default. */
static void prefer_passive_openmp_waits(char **argv) {
    if (getenv("OMP_WAIT_POLICY")) return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);
}

int main(int argc, char **argv) {
    prefer_passive_openmp_waits(argv);
    tf_seconds_since_start(); /* the log's clock starts here */
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        cli_print_help(NULL);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "help") == 0) {
        if (argc < 3) return cli_print_help(NULL);
        if (cli_print_help(argv[2]) == 0) return 0;
        fprintf(stderr, "tokenformer: unknown command '%s'; 'tokenformer help' lists them\n", argv[2]);
        return 2;
    }
    const cli_command *command = find_command(argv[1]);
    if (!command) {
        fprintf(stderr, "tokenformer: unknown command '%s'; 'tokenformer help' lists them\n", argv[1]);
        return 2;
    }
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return cli_print_help(command->name);
    if (!command->run) {
        fprintf(stderr, "tokenformer %s: not available in this version yet\n", command->name);
        return 2;
    }
    return command->run(argc - 1, argv + 1);
}
