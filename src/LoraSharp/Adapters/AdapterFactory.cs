using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>Builds adapter modules: from file weights (the contract) or new for training (with the tools' inits).</summary>
public static class AdapterFactory
{
    static readonly Dictionary<AdapterAlgorithm, string[]> Known = new()
    {
        [AdapterAlgorithm.LoRA] = ["lora_down", "lora_up", "lora_mid"],
        [AdapterAlgorithm.LoHa] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"],
        [AdapterAlgorithm.LoKr] = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"],
        [AdapterAlgorithm.Full] = ["diff", "diff_b"],
    };

    /// <summary>
    /// An adapter module from contract weights, stored as <paramref name="dtype"/> on <paramref name="device"/>.
    /// Unknown tensor names, missing tensors and shapes that do not fit the layer throw, naming the module.
    /// </summary>
    public static Adapter FromWeights(ModuleAdapterWeights w, LayerGeometry g, ScalarType dtype, Device device, bool trainable = false)
    {
        string at = $"Module '{w.ModulePath}' ({w.Algorithm})";
        var allowed = Known[w.Algorithm].Concat(["dora_scale", "magnitude"]).ToHashSet();
        var unknown = w.Tensors.Keys.Where(k => !allowed.Contains(k)).ToList();
        if (unknown.Count > 0)
            throw new LoraSharpException($"{at}: unknown adapter tensor(s) {string.Join(", ", unknown)}; expected some of {string.Join(", ", allowed)}.", key: w.ModulePath);
        Tensor? T(string name) => w.Has(name) ? w[name].detach().to(dtype, device).clone() : null;
        Tensor Req(string name) => T(name) ?? throw new LoraSharpException($"{at}: missing tensor '{name}'.", key: w.ModulePath);
        Adapter a;
        try
        {
            a = w.Algorithm switch
            {
                AdapterAlgorithm.LoRA => new LoraAdapter(w.ModulePath, g, Req("lora_down"), Req("lora_up"), T("lora_mid"), w.Alpha, w.RsLora, w.Convention, trainable),
                AdapterAlgorithm.LoHa => new LohaAdapter(w.ModulePath, g, Req("hada_w1_a"), Req("hada_w1_b"), Req("hada_w2_a"), Req("hada_w2_b"),
                    T("hada_t1"), T("hada_t2"), w.Alpha, w.RsLora, w.Convention, trainable),
                AdapterAlgorithm.LoKr => new LokrAdapter(w.ModulePath, g, T("lokr_w1"), T("lokr_w1_a"), T("lokr_w1_b"), T("lokr_w2"), T("lokr_w2_a"),
                    T("lokr_w2_b"), T("lokr_t2"), w.Alpha, w.RsLora, w.Convention, w.Rank, trainable),
                AdapterAlgorithm.Full => new FullAdapter(w.ModulePath, g, Req("diff"), T("diff_b"), trainable),
                _ => throw new ArgumentException($"{at}: unsupported algorithm."),
            };
            if (w.Has("magnitude")) a.SetDora(DoraKind.Peft, Req("magnitude"), trainable);
            else if (w.Has("dora_scale")) a.SetDora(DoraKind.DoraScale, Req("dora_scale"), trainable);
        }
        catch (ArgumentException e)
        {
            throw new LoraSharpException(e.Message.StartsWith("Module '") ? e.Message : $"{at}: {e.Message}", key: w.ModulePath, inner: e);
        }
        return a;
    }

    /// <summary>
    /// A new trainable adapter for a layer, initialised as the tools do: LoRA down kaiming-uniform (a=√5) or N(0,1/r),
    /// up zero; LoHa w1_b ~ N(0,1), w1_a ~ N(0,0.1), w2_b ~ N(0,1), w2_a = 0 (Tucker t ~ N(0,0.1)); LoKr W1 (or its
    /// factors) and w2_a kaiming, W2 / w2_b zero; Full zero. DoRA magnitude starts at ‖W‖ (needs <paramref name="baseWeight"/>).
    /// </summary>
    public static Adapter Create(string modulePath, LayerGeometry g, AdapterConfig c, Device device, Tensor? baseWeight = null)
    {
        using var _ = no_grad();
        bool kxk = g.IsConv && !g.IsPointwise;
        int r = kxk && c.ConvRank is { } cr ? cr : c.Rank;
        double? alpha = kxk && c.ConvRank is not null ? (c.ConvAlpha ?? c.Alpha) : c.Alpha;
        if (r < 1) throw new ArgumentOutOfRangeException(nameof(c), $"Rank must be at least 1, got {r}.");
        bool tucker = c.UseTucker && kxk;
        var dt = c.DType;
        Tensor Empty(params long[] shape) => empty(shape, dtype: dt, device: device);
        Tensor Kaiming(params long[] shape) => nn.init.kaiming_uniform_(Empty(shape), Math.Sqrt(5));
        Tensor Normal(double std, params long[] shape) => nn.init.normal_(Empty(shape), 0, std);
        Tensor Zeros(params long[] shape) => zeros(shape, dtype: dt, device: device);
        long kh = g.IsConv ? g.KernelSize[0] : 1, kw = g.IsConv ? g.KernelSize[1] : 1;

        Adapter a;
        switch (c.Algorithm)
        {
            case AdapterAlgorithm.LoRA:
            {
                if (c.DyLoraUnit is { } unit && tucker) throw new ArgumentException("DyLoRA does not support the Tucker form.");
                Tensor down = tucker ? Empty(r, g.InFeatures, 1, 1) : g.IsConv ? Empty(r, g.InFeatures, kh, kw) : Empty(r, g.InFeatures);
                if (c.Init == LoraInit.Gaussian) nn.init.normal_(down, 0, 1.0 / r); else nn.init.kaiming_uniform_(down, Math.Sqrt(5));
                Tensor up = g.IsConv ? Zeros(g.OutFeatures, r, 1, 1) : Zeros(g.OutFeatures, r);
                Tensor? mid = tucker ? Kaiming(r, r, kh, kw) : null;
                a = c.DyLoraUnit is { } u
                    ? new DyLoraAdapter(modulePath, g, down, up, alpha, u, trainable: true)
                    : new LoraAdapter(modulePath, g, down, up, mid, alpha, c.RsLora, c.Convention, trainable: true);
                break;
            }
            case AdapterAlgorithm.LoHa:
            {
                if (tucker)
                    a = new LohaAdapter(modulePath, g, Normal(0.1, r, g.OutFeatures), Normal(1, r, g.InFeatures), Zeros(r, g.OutFeatures), Normal(1, r, g.InFeatures),
                        Normal(0.1, r, r, kh, kw), Normal(0.1, r, r, kh, kw), alpha, c.RsLora, c.Convention, trainable: true);
                else
                    a = new LohaAdapter(modulePath, g, Normal(0.1, g.OutFeatures, r), Normal(1, r, g.FanIn), Zeros(g.OutFeatures, r), Normal(1, r, g.FanIn),
                        null, null, alpha, c.RsLora, c.Convention, trainable: true);
                break;
            }
            case AdapterAlgorithm.LoKr:
            {
                var (outA, outB) = LokrMath.Factorization(g.OutFeatures, c.LokrFactor);
                var (inC, inD) = LokrMath.Factorization(g.InFeatures, c.LokrFactor);
                bool decomposeW1 = c.DecomposeBoth && !c.FullMatrix && r < Math.Max(outA, inC) / 2.0;
                bool decomposeW2 = !c.FullMatrix && r < Math.Max(outB, inD) / 2.0;
                Tensor? w1 = null, w1a = null, w1b = null, w2 = null, w2a = null, w2b = null, t2 = null;
                if (decomposeW1) { w1a = Kaiming(outA, r); w1b = Kaiming(r, inC); } else w1 = Kaiming(outA, inC);
                if (!decomposeW2) w2 = g.IsConv ? Zeros(outB, inD, kh, kw) : Zeros(outB, inD);
                else if (tucker) { t2 = Kaiming(r, r, kh, kw); w2a = Kaiming(r, outB); w2b = Zeros(r, inD); }
                else { w2a = Kaiming(outB, r); w2b = Zeros(r, inD * kh * kw); }
                a = new LokrAdapter(modulePath, g, w1, w1a, w1b, w2, w2a, w2b, t2, alpha, c.RsLora, c.Convention, configuredRank: r, trainable: true);
                break;
            }
            case AdapterAlgorithm.Full:
                a = new FullAdapter(modulePath, g, Zeros(g.WeightShape), null, trainable: true);
                break;
            default:
                throw new ArgumentException($"Unsupported algorithm {c.Algorithm}.");
        }
        a.Dropout = c.Dropout;
        if (c.Dora != DoraKind.None)
        {
            if (baseWeight is null) throw new ArgumentException($"Module '{modulePath}': DoRA needs the base weight to initialise its magnitude.");
            a.InitDora(c.Dora, baseWeight);
        }
        return a;
    }
}
