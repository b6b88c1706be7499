using LoraSharp.Adapters;
using TorchSharp;
using static TorchSharp.torch;
using static LoraSharp.Tests.Adapters.TestTrees;

namespace LoraSharp.Tests.Adapters;

public class AlgorithmTests
{
    static readonly LayerGeometry Lin = LayerGeometry.Linear(12, 10);
    static readonly LayerGeometry Conv1 = LayerGeometry.Conv2d(6, 5, [1, 1]);
    static readonly LayerGeometry Conv3 = LayerGeometry.Conv2d(6, 5, [3, 3], [2, 2], [1, 1], [1, 1]);
    static readonly LayerGeometry Conv3Dil = LayerGeometry.Conv2d(4, 7, [3, 3], [1, 1], [2, 2], [2, 2]);

    static Tensor Input(LayerGeometry g) => g.IsConv ? randn(2, g.InFeatures, 9, 9, dtype: float64) : randn(2, 3, g.InFeatures, dtype: float64);

    public static TheoryData<string> Geometries => new() { "linear", "conv1x1", "conv3x3", "conv3x3dil" };

    static LayerGeometry G(string name) => name switch
    {
        "linear" => Lin, "conv1x1" => Conv1, "conv3x3" => Conv3, _ => Conv3Dil,
    };

    [Theory]
    [MemberData(nameof(Geometries))]
    public void Lora_bypass_forward_equals_layer_op_with_delta_weight(string geometry)
    {
        using var scope = NewDisposeScope();
        manual_seed(1);
        var g = G(geometry);
        long r = 3;
        var down = g.IsConv ? randn(r, g.InFeatures, g.KernelSize[0], g.KernelSize[1], dtype: float64) : randn(r, g.InFeatures, dtype: float64);
        var up = g.IsConv ? randn(g.OutFeatures, r, 1, 1, dtype: float64) : randn(g.OutFeatures, r, dtype: float64);
        var x = Input(g);
        var dw = LoraMath.DeltaWeight(down, up, null, 0.5, g);
        Assert.Equal(g.WeightShape, dw.shape);
        Assert.True(MaxAbs(LoraMath.Bypass(x, down, up, null, 0.5, g), g.Apply(x, dw)) < 1e-10);
        // the matrix form: ΔW as [out, in·k] = up·down·s
        Assert.True(MaxAbs(dw.reshape(g.OutFeatures, -1), up.reshape(g.OutFeatures, r).matmul(down.reshape(r, -1)).mul(0.5)) < 1e-12);
    }

    [Theory]
    [InlineData("conv3x3")]
    [InlineData("conv3x3dil")]
    public void Tucker_locon_delta_matches_the_three_convolutions(string geometry)
    {
        using var scope = NewDisposeScope();
        manual_seed(2);
        var g = G(geometry);
        long r = 3;
        var down = randn(r, g.InFeatures, 1, 1, dtype: float64);
        var mid = randn(r, r, 3, 3, dtype: float64);
        var up = randn(g.OutFeatures, r, 1, 1, dtype: float64);
        var x = Input(g);
        var dw = LoraMath.DeltaWeight(down, up, mid, 2.0, g);
        Assert.True(MaxAbs(LoraMath.Bypass(x, down, up, mid, 2.0, g), g.Apply(x, dw)) < 1e-9);
        // explicit sum for one element: ΔW[o,i,h,w] = Σ up[o,p]·mid[p,q,h,w]·down[q,i]
        double expect = 0;
        for (int p = 0; p < r; p++)
            for (int q = 0; q < r; q++)
                expect += up[1, p, 0, 0].item<double>() * mid[p, q, 2, 0].item<double>() * down[q, 3, 0, 0].item<double>();
        Assert.Equal(expect * 2.0, dw[1, 3, 2, 0].item<double>(), 10);
    }

    [Fact]
    public void Loha_delta_is_hadamard_of_two_products_times_scale()
    {
        using var scope = NewDisposeScope();
        manual_seed(3);
        var g = Lin;
        var (w1a, w1b, w2a, w2b) = (randn(10, 4, dtype: float64), randn(4, 12, dtype: float64), randn(10, 4, dtype: float64), randn(4, 12, dtype: float64));
        var dw = LohaMath.DeltaWeight(w1a, w1b, w2a, w2b, null, null, 0.25, g);
        Assert.True(MaxAbs(dw, w1a.matmul(w1b).mul(w2a.matmul(w2b)).mul(0.25)) < 1e-12);
    }

    [Fact]
    public void Loha_tucker_factor_matches_explicit_sum()
    {
        using var scope = NewDisposeScope();
        manual_seed(4);
        var g = Conv3;
        long r = 2;
        var t = randn(r, r, 3, 3, dtype: float64);
        var wa = randn(r, g.OutFeatures, dtype: float64);
        var wb = randn(r, g.InFeatures, dtype: float64);
        var f = LohaMath.Factor(wa, wb, t, g);
        Assert.Equal(g.WeightShape, f.shape);
        double expect = 0;
        for (int i = 0; i < r; i++)
            for (int j = 0; j < r; j++)
                expect += t[i, j, 1, 2].item<double>() * wa[i, 4].item<double>() * wb[j, 5].item<double>();
        Assert.Equal(expect, f[4, 5, 1, 2].item<double>(), 10);
    }

    [Fact]
    public void Lokr_delta_is_kron_of_factors_for_linear_and_conv()
    {
        using var scope = NewDisposeScope();
        manual_seed(5);
        var w1 = randn(2, 3, dtype: float64);
        var w2a = randn(5, 2, dtype: float64);
        var w2b = randn(2, 4, dtype: float64);
        var dw = LokrMath.DeltaWeight(w1, null, null, null, w2a, w2b, null, 0.5, Lin);
        Assert.True(MaxAbs(dw, kron(w1, w2a.matmul(w2b)).mul(0.5)) < 1e-12);

        var g = Conv3; // out 5 = 1·5, in 6 = 2·3
        var c1 = randn(1, 2, dtype: float64);
        var c2 = randn(5, 3, 3, 3, dtype: float64);
        var dc = LokrMath.DeltaWeight(c1, null, null, c2, null, null, null, 1.0, g);
        Assert.Equal(g.WeightShape, dc.shape);
        Assert.Equal(c1[0, 1].item<double>() * c2[4, 2, 1, 0].item<double>(), dc[4, 3 + 2, 1, 0].item<double>(), 12);
        // Tucker W2
        var t2 = randn(2, 2, 3, 3, dtype: float64);
        var ta = randn(2, 5, dtype: float64);
        var tb = randn(2, 3, dtype: float64);
        var w2t = LokrMath.W2(null, ta, tb, t2, 5, 3, g);
        double expect = 0;
        for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) expect += t2[i, j, 0, 2].item<double>() * ta[i, 3].item<double>() * tb[j, 1].item<double>();
        Assert.Equal(expect, w2t[3, 1, 0, 2].item<double>(), 10);
    }

    [Theory]
    [InlineData(128, -1, 8, 16)]
    [InlineData(320, -1, 16, 20)]
    [InlineData(768, -1, 24, 32)]
    [InlineData(1280, -1, 32, 40)]
    [InlineData(64, -1, 8, 8)]
    [InlineData(176, -1, 11, 16)]
    [InlineData(320, 4, 4, 80)]
    [InlineData(320, 80, 4, 80)]
    [InlineData(7, -1, 1, 7)]
    [InlineData(100, 3, 2, 50)]
    public void Lokr_factorization_follows_lycoris(long n, long f, long m, long k)
    {
        Assert.Equal((m, k), LokrMath.Factorization(n, f));
    }

    [Fact]
    public void Scale_rules_for_lora_rslora_and_lokr_conventions()
    {
        Assert.Equal(0.5, LoraMath.Scale(2, 4));
        Assert.Equal(1.0, LoraMath.Scale(null, 4));
        Assert.Equal(2 / Math.Sqrt(4), LoraMath.Scale(2, 4, rsLora: true));
        Assert.Equal(1.0, LokrMath.Scale(2, null, null, false, ScaleConvention.LyCORIS));
        Assert.Equal(0.5, LokrMath.Scale(2, null, 4, false, ScaleConvention.Peft));
        Assert.Equal(0.5, LokrMath.Scale(2, 4, null, false, ScaleConvention.LyCORIS));
        Assert.Throws<ArgumentException>(() => LokrMath.Scale(2, null, null, false, ScaleConvention.Peft));
    }

    [Fact]
    public void Dora_axis_is_inferred_from_the_shape()
    {
        Assert.Equal(DoraAxis.Output, DoraMath.InferAxis([10, 1], [10, 12]));
        Assert.Equal(DoraAxis.Input, DoraMath.InferAxis([1, 12], [10, 12]));
        Assert.Equal(DoraAxis.Output, DoraMath.InferAxis([5, 1, 1, 1], [5, 6, 3, 3]));
        Assert.Equal(DoraAxis.Input, DoraMath.InferAxis([1, 6, 1, 1], [5, 6, 3, 3]));
        Assert.Throws<ArgumentException>(() => DoraMath.InferAxis([3, 1], [10, 12]));
    }

    [Fact]
    public void Dora_merged_rows_have_the_magnitude_as_norm()
    {
        using var scope = NewDisposeScope();
        manual_seed(6);
        var w = randn(10, 12, dtype: float64);
        var d = randn(10, 12, dtype: float64).mul(0.1);
        var mag = rand(10, dtype: float64).add(0.5);
        var merged = DoraMath.MergedWeight(w, d, mag, DoraAxis.Output);
        Assert.True(MaxAbs(merged.norm(1), mag) < 1e-12);
        var mergedIn = DoraMath.MergedWeight(w, d, rand(1, 12, dtype: float64).add(0.5), DoraAxis.Input);
        Assert.Equal(new long[] { 10, 12 }, mergedIn.shape);
        // multiplier rules for dora_scale: interpolation is linear in m; LyCORIS keeps W+ΔW at m = 0
        var ds = mag.reshape(10, 1);
        var e1 = DoraMath.EffectiveDelta(w, d, ds, DoraAxis.Output, 1.0, peftStyle: false);
        var eh = DoraMath.EffectiveDelta(w, d, ds, DoraAxis.Output, 0.5, peftStyle: false);
        Assert.True(MaxAbs(eh, e1.mul(0.5)) < 1e-12);
        var l0 = DoraMath.EffectiveDelta(w, d, ds, DoraAxis.Output, 0.0, peftStyle: false, DoraMultiplierRule.LyCORIS);
        Assert.True(MaxAbs(l0, d) < 1e-12);
        var l1 = DoraMath.EffectiveDelta(w, d, ds, DoraAxis.Output, 1.0, peftStyle: false, DoraMultiplierRule.LyCORIS);
        Assert.True(MaxAbs(l1, e1) < 1e-12);
    }

    [Fact]
    public void Dylora_truncation_keeps_the_first_ranks_and_alpha()
    {
        using var scope = NewDisposeScope();
        var down = arange(8 * 3, dtype: float32).reshape(8, 3);
        var up = arange(5 * 8, dtype: float32).reshape(5, 8);
        using var w = new ModuleAdapterWeights
        {
            ModulePath = "m", Algorithm = AdapterAlgorithm.LoRA,
            Tensors = new Dictionary<string, Tensor> { ["lora_down"] = down.clone(), ["lora_up"] = up.clone() }, Alpha = 4,
        };
        using var t = DyLoraMath.Truncate(w, 2);
        Assert.Equal(new long[] { 2, 3 }, t["lora_down"].shape);
        Assert.Equal(new long[] { 5, 2 }, t["lora_up"].shape);
        Assert.Equal(4, t.Alpha);
        Assert.True(MaxAbs(t["lora_down"], down[..2]) == 0);
        Assert.True(MaxAbs(t["lora_up"], up[.., ..2]) == 0);
        Assert.Throws<ArgumentOutOfRangeException>(() => DyLoraMath.Truncate(down, up, 9));
    }

    [Fact]
    public void Bad_factor_shapes_throw_naming_the_module()
    {
        using var scope = NewDisposeScope();
        using var w = new ModuleAdapterWeights
        {
            ModulePath = "blocks.0.q", Algorithm = AdapterAlgorithm.LoRA,
            Tensors = new Dictionary<string, Tensor> { ["lora_down"] = zeros(4, 11), ["lora_up"] = zeros(10, 4) },
        };
        var e = Assert.Throws<LoraSharpException>(() => AdapterFactory.FromWeights(w, Lin, float32, CPU));
        Assert.Contains("blocks.0.q", e.Message);
        Assert.Contains("lora_down", e.Message);
    }
}
