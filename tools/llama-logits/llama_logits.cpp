// Evaluate a token sequence with llama.cpp (its own deepseek4 graph, CPU) and write the logits
// of every position as float32 .npy [n_tokens, n_vocab]: the llama.cpp side of the logit
// cross-checks in tools/README.md. Build with build.sh against a llama.cpp build tree.
//
// usage: llama_logits MODEL.gguf TOKENS.txt OUT.npy [threads]
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS.txt OUT.npy [threads]\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> tokens;
    {
        std::ifstream in(argv[2]);
        long long t;
        while (in >> t) {
            tokens.push_back((llama_token) t);
        }
    }
    if (tokens.empty()) {
        fprintf(stderr, "no tokens in %s\n", argv[2]);
        return 2;
    }
    const int n = (int) tokens.size();
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "could not load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = ((n + 16 + 255) / 256) * 256;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.kv_unified = true;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    if (argc > 4) {
        cp.n_threads = cp.n_threads_batch = atoi(argv[4]);
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "could not create a context\n");
        return 1;
    }
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * f = fopen(argv[3], "wb");
    if (!f) {
        fprintf(stderr, "could not create %s\n", argv[3]);
        return 1;
    }
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(n) + ", " +
                         std::to_string(n_vocab) + "), }";
    while ((10 + header.size() + 1) % 64 != 0) {
        header += ' ';
    }
    header += '\n';
    const unsigned short hlen = (unsigned short) header.size();
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fwrite(&hlen, 2, 1, f);
    fwrite(header.data(), 1, header.size(), f);
    for (int i = 0; i < n; i++) {
        fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, f);
    }
    fclose(f);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
