// Running top-k merge of a score tile into each pattern's best matches.
//
// Contract (shared with the numba twin dpm.match._topk_merge_cpu):
//   afterwards row r of (best_scores, best_indices) holds the k best of its
//   previous entries and the candidates (scores[r, j], offset + j), j < cols,
//   ordered by descending score and, among equal scores, ascending dictionary
//   index. Slots with index -1 are empty (their score, -inf, is ignored) and
//   lose to any candidate; NaN scores never enter. Empty slots can only remain
//   at the tail and are left untouched.
//
// Layout: scores (rows, cols) float32; best_scores (rows, k) float32;
//   best_indices (rows, k) int64; all C-contiguous. k <= TOPK_MAX_K.
//
// Launch geometry (set in dpm/match.py, _topk_merge_gpu):
//   grid  = rows blocks, block b owns pattern row b;
//   block = B threads, B a power of two (128, fewer for narrow tiles); thread t
//           scans columns t, t + B, ... (coalesced loads) keeping a private
//           sorted top-k in local memory; a candidate must first beat the row's
//           current k-th best, read once from the state, so after the first
//           dictionary chunks almost every element is rejected by one compare;
//   then k rounds of a shared-memory tree argmax over the B list heads pick the
//   merged list (thread 0 starts with the row's previous entries, so the state
//   takes part in the merge), each winner advancing its head.
//   dynamic shared memory = B * 16 bytes (index, score, owner per thread).
//
// Expected H100 cost per score tile of R x C (e.g. 4096 x 16384, npix 3600):
//   reads 4 R C bytes once (268 MB: ~0.09 ms at ~3 TB/s); insertions per thread
//   ~k ln(C / (B k)) in the first chunk and nearly none later; the merge costs
//   k (log2 B + 2) barriers per block (~90 for k = 10), tens of microseconds
//   over the 4096 blocks. Total ~0.1-0.3 ms against ~9.7 ms for the tile's
//   GEMM (2 R C npix = 483 GFLOP at ~50 TFLOP/s): a few percent at most.

#ifndef DPM_HOST_SHIM
#define DPM_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// Largest k; must equal _GPU_MAX_KEEP in dpm/match.py (checked there).
#define TOPK_MAX_K 64
// Index of an exhausted list head in the merge (beats nothing).
#define TOPK_NONE 0x7fffffffffffffffLL

// True when candidate (s, i) ranks before entry (t, j) of a top-k list:
// higher score first, then lower index; an empty entry (j < 0) loses to any
// non-NaN candidate; NaN beats nothing.
__device__ inline bool topk_beats(float s, long long i, float t, long long j)
{
    if (j < 0) {
        return s == s;
    }
    return s > t || (s == t && i < j);
}

// Insert (s, i), known to beat list entry k-1 (or to fill a free slot), into a
// sorted list of `count` entries, keeping at most k.
__device__ inline void topk_insert(float* list_s, long long* list_i, int* count, int k,
                                   float s, long long i)
{
    int p = *count < k ? *count : k - 1;
    if (*count < k) {
        *count += 1;
    }
    while (p > 0 && topk_beats(s, i, list_s[p - 1], list_i[p - 1])) {
        list_s[p] = list_s[p - 1];
        list_i[p] = list_i[p - 1];
        --p;
    }
    list_s[p] = s;
    list_i[p] = i;
}

extern "C" __global__ void topk_merge(const float* __restrict__ scores, int rows, int cols,
                                      long long offset, float* best_scores,
                                      long long* best_indices, int k)
{
    DPM_DYNAMIC_SHARED(long long, shared);
    long long* head_index = shared;                                   // B entries
    float* head_score = reinterpret_cast<float*>(head_index + blockDim.x);  // B entries
    int* head_owner = reinterpret_cast<int*>(head_score + blockDim.x);      // B entries

    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const float* tile = scores + static_cast<long long>(row) * cols;
    float* state_s = best_scores + static_cast<long long>(row) * k;
    long long* state_i = best_indices + static_cast<long long>(row) * k;

    float list_s[TOPK_MAX_K];
    long long list_i[TOPK_MAX_K];
    int count = 0;
    // Threshold: the row's k-th best (empty when its index is -1), then the
    // thread's own k-th once its list is full. All state reads happen here,
    // before the first barrier; the state is rewritten only in the merge.
    float thr_s = state_s[k - 1];
    long long thr_i = state_i[k - 1];
    if (tid == 0) {
        while (count < k && state_i[count] >= 0) {
            list_s[count] = state_s[count];
            list_i[count] = state_i[count];
            ++count;
        }
    }

    for (int j = tid; j < cols; j += blockDim.x) {
        const float s = tile[j];
        const long long i = offset + j;
        if (topk_beats(s, i, thr_s, thr_i)) {
            topk_insert(list_s, list_i, &count, k, s, i);
            if (count == k) {
                thr_s = list_s[k - 1];
                thr_i = list_i[k - 1];
            }
        }
    }

    // Merge: round r writes the r-th best of all lists into the state.
    int head = 0;
    for (int r = 0; r < k; ++r) {
        head_score[tid] = head < count ? list_s[head] : 0.0f;
        head_index[tid] = head < count ? list_i[head] : TOPK_NONE;
        head_owner[tid] = tid;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
            if (tid < stride) {
                const int o = tid + stride;
                const bool other_wins = head_index[o] != TOPK_NONE &&
                    (head_index[tid] == TOPK_NONE ||
                     topk_beats(head_score[o], head_index[o], head_score[tid], head_index[tid]));
                if (other_wins) {
                    head_score[tid] = head_score[o];
                    head_index[tid] = head_index[o];
                    head_owner[tid] = head_owner[o];
                }
            }
            __syncthreads();
        }
        const long long winner = head_index[0];  // same value in every thread
        if (winner == TOPK_NONE) {
            break;  // fewer than k candidates: the remaining slots stay empty
        }
        if (tid == head_owner[0]) {
            ++head;
        }
        if (tid == 0) {
            state_s[r] = head_score[0];
            state_i[r] = winner;
        }
        __syncthreads();  // everyone has read the winner before the next round
    }
}
