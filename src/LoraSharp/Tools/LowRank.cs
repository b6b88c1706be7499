using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tools;

/// <summary>How a truncated SVD is computed.</summary>
public enum SvdMethod
{
    /// <summary>Per module: randomized when the matrix is large compared to the rank and the sketch shows enough
    /// spectral decay for the result to equal the full SVD to tolerance; full <c>linalg.svd</c> otherwise.</summary>
    Auto,
    /// <summary>Always <c>torch.linalg.svd</c> of the whole matrix (the tools' behaviour).</summary>
    Full,
    /// <summary>Always the randomized range finder (sketch, QR power iterations, small SVD).</summary>
    Randomized,
}

/// <summary>kohya's dynamic rank rules (resize_lora.py).</summary>
public enum DynamicRankMethod
{
    None,
    /// <summary>Keep singular values with S_i &gt; S_0 / value.</summary>
    SvRatio,
    /// <summary>Smallest k with Σ_{i&lt;k} S_i² / ΣS² ≥ value² (Frobenius retention).</summary>
    SvFro,
    /// <summary>Smallest k with Σ_{i&lt;k} S_i / ΣS ≥ value.</summary>
    SvCumulative,
}

/// <summary>A truncated SVD: <c>M ≈ U·diag(S)·Vh</c> with k columns/rows, plus how it was computed.</summary>
public sealed class TruncatedSvd : IDisposable
{
    public required Tensor U { get; init; }
    public required Tensor S { get; init; }
    public required Tensor Vh { get; init; }
    /// <summary>The method actually used (Auto resolves to Full or Randomized).</summary>
    public required SvdMethod Method { get; init; }
    /// <summary>‖M‖_F² (the energy the truncation is measured against).</summary>
    public required double TotalEnergy { get; init; }
    /// <summary>Σ S (all singular values, when known; for the randomized path the sum over the sketch).</summary>
    public required double TotalSum { get; init; }

    public void Dispose()
    {
        U.Dispose();
        S.Dispose();
        Vh.Dispose();
    }
}

/// <summary>
/// The linear algebra of the LoRA tools: full and randomized truncated SVDs (TorchSharp has no <c>svd_lowrank</c>), the
/// exact SVD of a low-rank product without forming it, kohya's quantile clamp and its dynamic rank rules.
/// All computation in float32 (or the input's float64).
/// </summary>
public static class LowRank
{
    /// <summary>Oversampling of the randomized sketch (columns beyond the rank).</summary>
    public const int Oversample = 10;

    /// <summary>Most power (subspace) iterations of the randomized path (it stops earlier when converged).</summary>
    public const int PowerIterations = 4;

    /// <summary>Auto falls back to the full SVD when the sketch's decay bound (σ_l/σ_k)^(2q+1) exceeds this.</summary>
    public const double RandomizedTolerance = 1e-4;

    /// <summary>
    /// True when the randomized path is worth trying for an m×n matrix at rank k: the sketch (k + oversampling) is at most
    /// a quarter of the smaller side and the matrix is not tiny.
    /// </summary>
    public static bool PreferRandomized(long rows, long cols, long rank)
    {
        long small = Math.Min(rows, cols);
        return small >= 256 && (rank + Oversample) * 4 <= small;
    }

    /// <summary>
    /// The top-<paramref name="rank"/> SVD of a matrix. <see cref="SvdMethod.Auto"/> uses the randomized path when
    /// <see cref="PreferRandomized"/> holds and its a-posteriori check passes (the singular value just past the sketch's
    /// rank is small enough that the power iterations have converged to <see cref="RandomizedTolerance"/>), else the
    /// full SVD. <paramref name="seed"/> makes the randomized sketch reproducible.
    /// </summary>
    public static TruncatedSvd Svd(Tensor m, long rank, SvdMethod method = SvdMethod.Auto, long seed = 0)
    {
        if (m.dim() != 2) throw new ArgumentException($"SVD needs a matrix, got shape [{string.Join(", ", m.shape)}].");
        long rows = m.shape[0], cols = m.shape[1];
        long k = Math.Max(1, Math.Min(rank, Math.Min(rows, cols)));
        using var scope = NewDisposeScope();
        var a = m.dtype == ScalarType.Float64 ? m : m.to_type(ScalarType.Float32);
        double energy = a.square().sum().to_type(ScalarType.Float64).item<double>();
        bool tryRandom = method == SvdMethod.Randomized || (method == SvdMethod.Auto && PreferRandomized(rows, cols, k));
        if (tryRandom)
        {
            var (u, s, vh, decay) = RandomizedCore(a, k, seed);
            if (method == SvdMethod.Randomized || decay <= RandomizedTolerance)
            {
                return new TruncatedSvd
                {
                    U = u.MoveToOuterDisposeScope(), S = s.MoveToOuterDisposeScope(), Vh = vh.MoveToOuterDisposeScope(),
                    Method = SvdMethod.Randomized, TotalEnergy = energy, TotalSum = double.NaN,
                };
            }
        }
        var (U, S, Vh) = linalg.svd(a, fullMatrices: false);
        double total = S.sum().to_type(ScalarType.Float64).item<double>();
        return new TruncatedSvd
        {
            U = U[.., ..(int)k].contiguous().MoveToOuterDisposeScope(),
            S = S[..(int)k].contiguous().MoveToOuterDisposeScope(),
            Vh = Vh[..(int)k].contiguous().MoveToOuterDisposeScope(),
            Method = SvdMethod.Full, TotalEnergy = energy, TotalSum = total,
        };
    }

    /// <summary>
    /// Randomized range finder with adaptive power iterations: after each stage the small SVD of B = Qᵀ·A gives the
    /// sketch's singular values and the convergence bound (σ_l/σ_k)^(2q+1); it stops when that is below the tolerance
    /// or after <see cref="PowerIterations"/> iterations. B also gives Aᵀ·Q = Bᵀ for the next iteration, so a stage
    /// costs two products with A. Returns the top k triplets and the last bound.
    /// </summary>
    static (Tensor U, Tensor S, Tensor Vh, double Decay) RandomizedCore(Tensor a, long k, long seed)
    {
        long rows = a.shape[0], cols = a.shape[1];
        long small = Math.Min(rows, cols);
        long l = Math.Min(small, k + Oversample);
        using var gen = new Generator((ulong)seed, a.device);
        var omega = randn([cols, l], dtype: a.dtype, device: a.device, generator: gen);
        var (q, _) = linalg.qr(a.matmul(omega));
        for (int iteration = 0; ; iteration++)
        {
            var b = q.t().matmul(a);                       // [l, cols]
            var (ub, s, vh) = linalg.svd(b, fullMatrices: false);
            double sk = s[k - 1].to_type(ScalarType.Float64).item<double>(), sl = s[l - 1].to_type(ScalarType.Float64).item<double>();
            double decay = l == small ? 0 : sk <= 0 ? 0 : Math.Pow(sl / sk, 2 * iteration + 1);
            if (decay <= RandomizedTolerance || iteration == PowerIterations)
            {
                var u = q.matmul(ub);
                return (u[.., ..(int)k].contiguous(), s[..(int)k].contiguous(), vh[..(int)k].contiguous(), decay);
            }
            var (z, _) = linalg.qr(b.t());                 // orthonormal basis of Aᵀ·Q
            (q, _) = linalg.qr(a.matmul(z));
        }
    }

    /// <summary>
    /// LoRA factors of rank <paramref name="rank"/> from an SVD: up = U[:, :k]·diag(S[:k]) [out, rank], down = Vh[:k]
    /// [rank, in]; when the SVD has fewer than <paramref name="rank"/> directions the rest are zero (up·down unchanged).
    /// </summary>
    public static (Tensor Up, Tensor Down) Factors(Tensor u, Tensor s, Tensor vh, long rank)
    {
        long take = Math.Min(rank, s.shape[0]);
        var up = u[.., ..(int)take].mul(s[..(int)take].unsqueeze(0));
        var down = vh[..(int)take];
        if (take < rank)
        {
            up = cat([up, zeros(u.shape[0], rank - take, dtype: up.dtype, device: up.device)], 1);
            down = cat([down, zeros(rank - take, vh.shape[1], dtype: down.dtype, device: down.device)], 0);
        }
        return (up, down);
    }

    /// <summary>
    /// The exact SVD of <c>left·right</c> (<c>[m, r]·[r, n]</c>) without forming the product: QR of both factors and
    /// the SVD of the r×r core. Returns all r singular triplets (zeros included), largest first.
    /// </summary>
    public static (Tensor U, Tensor S, Tensor Vh) FactoredSvd(Tensor left, Tensor right)
    {
        using var scope = NewDisposeScope();
        var l = left.to_type(ScalarType.Float32);
        var r = right.to_type(ScalarType.Float32);
        var (ql, rl) = linalg.qr(l);           // [m, r'], [r', r]
        var (qr, rr) = linalg.qr(r.t());       // [n, r'], [r', r]
        var core = rl.matmul(rr.t());          // [r', r'']
        var (uc, s, vch) = linalg.svd(core, fullMatrices: false);
        var u = ql.matmul(uc);
        var vh = vch.matmul(qr.t());
        return (u.MoveToOuterDisposeScope(), s.MoveToOuterDisposeScope(), vh.MoveToOuterDisposeScope());
    }

    /// <summary>torch.quantile (linear interpolation) of all elements of a tensor.</summary>
    public static double Quantile(Tensor values, double q)
    {
        if (q < 0 || q > 1) throw new ArgumentOutOfRangeException(nameof(q), $"Quantile must be in [0, 1], got {q}.");
        using var scope = NewDisposeScope();
        var flat = values.flatten().to_type(ScalarType.Float64);
        long n = flat.shape[0];
        if (n == 0) return 0;
        var (sorted, _) = flat.sort();
        double pos = q * (n - 1);
        long lo = (long)Math.Floor(pos), hi = (long)Math.Ceiling(pos);
        double a = sorted[lo].item<double>(), b = sorted[hi].item<double>();
        return a + (b - a) * (pos - lo);
    }

    /// <summary>
    /// kohya's clamp: hi = quantile(concat(up, down), q); both clamped to [−hi, hi] in place. Returns hi.
    /// </summary>
    public static double ClampQuantile(Tensor up, Tensor down, double q)
    {
        using var scope = NewDisposeScope();
        double hi = Quantile(cat([up.flatten(), down.flatten()]), q);
        up.clamp_(-hi, hi);
        down.clamp_(-hi, hi);
        return hi;
    }

    /// <summary>Zero-matrix threshold of kohya's resize (S[0] ≤ this → rank 1).</summary>
    public const double MinSingularValue = 1e-6;

    /// <summary>
    /// kohya's resize rank rule: with a dynamic method the index found by the rule (clamped to [1, L−1], L = the number
    /// of singular values of the full matrix) plus one; then capped at <paramref name="maxRank"/>; a zero matrix gets 1.
    /// <paramref name="s"/> holds the leading singular values (descending); the rest of the L values are zero.
    /// </summary>
    public static int ChooseRank(double[] s, long fullLength, int maxRank, DynamicRankMethod method, double value)
    {
        if (s.Length == 0) return 1;
        int L = (int)Math.Max(1, fullLength);
        int Clamp(int index) => Math.Max(1, Math.Min(index, L - 1));
        int rank;
        switch (method)
        {
            case DynamicRankMethod.SvRatio:
            {
                double min = s[0] / value;
                rank = Clamp(s.Count(x => x > min)) + 1;
                break;
            }
            case DynamicRankMethod.SvCumulative:
                rank = Clamp(SearchSorted(Cumulative(s, squared: false), value)) + 1;
                break;
            case DynamicRankMethod.SvFro:
                rank = Clamp(SearchSorted(Cumulative(s, squared: true), value * value)) + 1;
                break;
            default:
                rank = maxRank;
                break;
        }
        if (s[0] <= MinSingularValue) return 1;
        return Math.Min(rank, maxRank);
    }

    static double[] Cumulative(double[] s, bool squared)
    {
        var c = new double[s.Length];
        double total = s.Sum(x => squared ? x * x : x), acc = 0;
        for (int i = 0; i < s.Length; i++)
        {
            acc += squared ? s[i] * s[i] : s[i];
            c[i] = total > 0 ? acc / total : 1;
        }
        return c;
    }

    /// <summary>torch.searchsorted (left): the first index whose value is ≥ target (length when none).</summary>
    static int SearchSorted(double[] sorted, double target)
    {
        for (int i = 0; i < sorted.Length; i++) if (sorted[i] >= target) return i;
        return sorted.Length;
    }

    /// <summary>Share of Σ S and of ‖·‖_F kept by the first k singular values, and S_0/S_{k−1}.</summary>
    public static (double SumRetained, double FroRetained, double MaxRatio) Retained(double[] s, int k)
    {
        k = Math.Min(k, s.Length);
        double sum = s.Sum(), sumK = s.Take(k).Sum();
        double fro = s.Sum(x => x * x), froK = s.Take(k).Sum(x => x * x);
        return (sum > 0 ? sumK / sum : 1, fro > 0 ? Math.Sqrt(froK / fro) : 1, k > 0 && s[k - 1] > 0 ? s[0] / s[k - 1] : double.PositiveInfinity);
    }

    /// <summary>Parses sv_ratio / sv_fro / sv_cumulative.</summary>
    public static DynamicRankMethod ParseDynamic(string? name) => name?.ToLowerInvariant().Replace('-', '_') switch
    {
        null or "" or "none" => DynamicRankMethod.None,
        "sv_ratio" => DynamicRankMethod.SvRatio,
        "sv_fro" => DynamicRankMethod.SvFro,
        "sv_cumulative" => DynamicRankMethod.SvCumulative,
        _ => throw new LoraSharpException($"unknown dynamic method '{name}' (expected sv_ratio, sv_fro or sv_cumulative)", null, "--dynamic"),
    };

    public static string Name(DynamicRankMethod m) => m switch
    {
        DynamicRankMethod.SvRatio => "sv_ratio",
        DynamicRankMethod.SvFro => "sv_fro",
        DynamicRankMethod.SvCumulative => "sv_cumulative",
        _ => "none",
    };
}
